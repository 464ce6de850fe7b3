"""The tab's auto-label button: a real daemon label job, driven by the tab's handler in the WebUI's Python."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from daemon_harness import DaemonProcess
from webui_env import FAKE_WEBUI, REPO, gradio3_python, make_webui_root, webui_env

from shared.fixtures.images import make_image_folder
from shared.images.dataset import scan_dataset


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    from shared.fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_webui"))


def test_auto_label_button_captions_the_dataset(tmp_path, tmp_path_factory, tiny_sd, clip_files):
    python = gradio3_python()
    images = make_image_folder(tmp_path / "data" / "shapes", count=4, captions="none")
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    try:
        root = make_webui_root(tmp_path / "webui", tiny_sd["safetensors"], {
            "lora_daemon_state_dir": str(daemon.state_dir), "lora_daemon_address": f"127.0.0.1:{daemon.port}"})
        code = f"""
            import json, sys
            sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(REPO / 'extension_webui')!r}]
            from lora_daemon_webui import form, ui
            frames = list(ui.auto_label({str(images)!r}, form.CAPTION_AUTO, {str(clip_files['config'])!r},
                                        {str(clip_files['weights'])!r}, "shapes_style"))
            print(json.dumps(frames))
        """
        env = webui_env(root, tmp_path / "calls.jsonl")
        out = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
    finally:
        daemon.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    frames = json.loads(out.stdout.strip().splitlines()[-1])
    assert frames[0].startswith("Auto-label job") and "Labelling: 4/4 images" in frames
    assert frames[-1].startswith("Labelled 4 images, kept 0 existing captions"), frames
    scan = scan_dataset(images)
    assert scan.captioned == 4 and all(item.caption.startswith("shapes_style") for item in scan.items)
