"""AUTOMATIC1111 / Forge extension script: the "Train LoRA" tab and its settings.

The WebUI puts the extension folder on sys.path only while this file loads, so our package is
imported now; the tab itself is built when the WebUI asks for its tabs.
"""

import sys
from pathlib import Path

from modules import script_callbacks

_EXTENSION_DIR = str(Path(__file__).resolve().parent.parent)
_added = _EXTENSION_DIR not in sys.path
if _added:
    sys.path.insert(0, _EXTENSION_DIR)
try:
    from lora_daemon_webui import host
finally:
    if _added:
        sys.path.remove(_EXTENSION_DIR)


def on_ui_tabs():
    try:
        from lora_daemon_webui.ui import build_tab
    except Exception as exc:  # say it in the tab instead of only in the console
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as broken:
            gr.Markdown(f"⚠️ The Train LoRA tab could not load: `{type(exc).__name__}: {exc}`. See docs/webui.md.")
        return [(broken, "Train LoRA", "train_lora")]
    return [(build_tab(), "Train LoRA", "train_lora")]


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(host.register_settings)
