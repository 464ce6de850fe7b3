"""Stand-in for ComfyUI's server module: PromptServer.instance.send_sync and send_progress_text (ComfyUI
0.3.6x: text shown on a node, sent as a binary TEXT message) record what they were given."""

from __future__ import annotations


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self):
        PromptServer.instance = self
        self.messages: list[tuple] = []
        self.texts: list[tuple[str, str]] = []  # (node id, text) per send_progress_text
        self.client_id = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((str(node_id), text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text))
