"""The gradio 3.41.2 test environment (tests/webui/setup_env.sh) and the stand-in WebUI around it."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FAKE_WEBUI = HERE / "fake_webui"
BLOCKED = "torch,torchvision,diffusers,transformers,peft,accelerate,safetensors"

_lock = threading.Lock()
_python: dict[str, str] = {}


def gradio3_python() -> str:
    """The test environment's python, built by setup_env.sh if needed; skip only if it cannot be built.
    $LORA_WEBUI_TEST_PYTHON runs the same tests with another environment's Python instead."""
    with _lock:
        if os.environ.get("LORA_WEBUI_TEST_PYTHON"):  # e.g. an environment with Forge's gradio 4.40
            _python["python"] = os.environ["LORA_WEBUI_TEST_PYTHON"]
        if "python" not in _python:
            try:
                out = subprocess.run(["bash", str(HERE / "setup_env.sh")], capture_output=True, text=True,
                                     timeout=900)
            except subprocess.TimeoutExpired:
                _python["python"] = ""
                _python["why"] = "tests/webui/setup_env.sh took over 15 minutes"
            else:
                lines = out.stdout.strip().splitlines()
                if out.returncode == 0 and lines and Path(lines[-1]).exists():
                    _python["python"] = lines[-1]
                else:
                    _python["python"] = ""
                    _python["why"] = (f"tests/webui/setup_env.sh failed ({out.returncode}): "
                                      f"{(out.stderr or out.stdout)[-800:]}")
        if not _python["python"]:
            pytest.skip("the gradio 3.41.2 WebUI test environment could not be built: " + _python["why"])
        if not shutil.which("chromium"):
            pytest.skip("Debian's chromium is not installed and setup_env.sh could not install it")
        return _python["python"]


def make_webui_root(root: Path, checkpoint: Path, settings: dict) -> Path:
    """A WebUI folder as the user has it: models/Stable-diffusion, models/Lora, extensions/lora-daemon
    (a symbolic link to this repository's extension_webui, as docs/webui.md says), config.json."""
    import json

    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "extensions").mkdir()
    (root / "models" / "Stable-diffusion" / checkpoint.name).symlink_to(checkpoint)
    (root / "extensions" / "lora-daemon").symlink_to(REPO / "extension_webui")
    (root / "config.json").write_text(json.dumps(settings))
    return root


def webui_env(root: Path, log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORA_DAEMON_HOME", "LORA_DAEMON_PYTHON")}
    env.update(FAKE_WEBUI_ROOT=str(root), FAKE_WEBUI_LOG=str(log), FAKE_WEBUI_BLOCK=BLOCKED,
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env
