"""Stand-in for ComfyUI's server module: PromptServer.instance.send_sync records its messages."""

from __future__ import annotations


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self):
        PromptServer.instance = self
        self.messages: list[tuple] = []
        self.client_id = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))
