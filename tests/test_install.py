"""install.py against fake WebUI and ComfyUI trees: links, records, idempotence, the daemon, undo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)  # the environment running the tests stands in for the daemon's own


def make_webui(root: Path) -> Path:
    (root / "extensions").mkdir(parents=True)
    (root / "models" / "Lora").mkdir(parents=True)
    (root / "webui.py").write_text("# AUTOMATIC1111\n")
    (root / "extensions" / "someone-elses").mkdir()
    return root


def make_comfyui(root: Path) -> Path:
    (root / "custom_nodes").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    (root / "folder_paths.py").write_text("# ComfyUI\n")
    return root


def snapshot(*roots: Path) -> dict:
    """Every path under the roots with what it is: file bytes, link target, or folder."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                out[str(path)] = ("file", path.read_bytes())
            else:
                out[str(path)] = ("dir",)
    return out


def run_install(*args, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("LORA_DAEMON_HOME", None)
    env.pop("XDG_STATE_HOME", None)
    return subprocess.run([sys.executable, str(REPO / "install.py"), "--venv", str(VENV), *args],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=600)


@pytest.fixture
def hosts(tmp_path):
    return make_webui(tmp_path / "webui"), make_comfyui(tmp_path / "ComfyUI"), tmp_path / "state"


def test_install_twice_start_daemon_then_uninstall(hosts, tmp_path):
    webui, comfy, state = hosts
    before = snapshot(webui, comfy)
    args = ("--webui", str(webui), "--comfyui", str(comfy), "--state-dir", str(state))

    first = run_install(*args, home=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    link_w, link_c = webui / "extensions" / "lora-daemon", comfy / "custom_nodes" / "lora-daemon"
    assert link_w.is_symlink() and link_w.resolve() == (REPO / "extension_webui").resolve()
    assert link_c.is_symlink() and link_c.resolve() == (REPO / "comfy_nodes").resolve()
    record = json.loads((state / "install.json").read_text())
    assert record["python"] == str(VENV / "bin" / "python")
    assert record["lora_dirs"] == sorted([str(webui / "models" / "Lora"), str(comfy / "models" / "loras")])

    installed = snapshot(webui, comfy, state)
    second = run_install(*args, home=tmp_path)
    assert second.returncode == 0 and "Nothing changed" in second.stdout
    assert snapshot(webui, comfy, state) == installed  # the second run changes nothing

    # the daemon may deploy into the hosts' Lora folders
    from daemon.settings import load_settings

    roots = load_settings(state).write_roots
    assert (webui / "models" / "Lora").resolve() in roots and (comfy / "models" / "loras").resolve() in roots

    # the extensions' path: no daemon running -> started from the recorded environment
    from shared.launcher import ensure_daemon

    info = ensure_daemon(state, extra_args=["--port", "0"])
    pid = json.loads((state / "daemon.json").read_text())["pid"]
    try:
        assert info["version"]
        checked = run_install("--check", "--state-dir", str(state), home=tmp_path)
        assert "daemon: answers" in checked.stdout and checked.returncode == 0, checked.stdout
    finally:
        os.kill(pid, signal.SIGTERM)

    gone = run_install("--uninstall", "--state-dir", str(state), home=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert snapshot(webui, comfy) == before
    assert not (state / "install.json").exists() and VENV.is_dir()  # not ours to remove: it existed


def test_never_replaces_a_folder_that_is_not_ours(hosts, tmp_path):
    webui, comfy, state = hosts
    (webui / "extensions" / "lora-daemon").mkdir()
    (webui / "extensions" / "lora-daemon" / "mine.txt").write_text("keep")
    out = run_install("--webui", str(webui), "--state-dir", str(state), home=tmp_path)
    assert out.returncode != 0 and "already exists and is not lora-daemon's" in out.stderr
    assert (webui / "extensions" / "lora-daemon" / "mine.txt").read_text() == "keep"


def test_not_a_host_folder(tmp_path):
    out = run_install("--comfyui", str(tmp_path), "--state-dir", str(tmp_path / "s"), home=tmp_path)
    assert out.returncode != 0 and "not a comfyui folder" in out.stderr


def test_detection_only_when_unambiguous(tmp_path):
    home = tmp_path / "home"
    make_comfyui(home / "ComfyUI")
    make_webui(home / "stable-diffusion-webui")
    make_webui(home / "stable-diffusion-webui-forge")
    state = tmp_path / "state"
    out = run_install("--state-dir", str(state), home=home, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Found several webui installs" in out.stdout
    record = json.loads((state / "install.json").read_text())
    assert list(record["hosts"]) == ["comfyui"]
    assert not (home / "stable-diffusion-webui" / "extensions" / "lora-daemon").exists()


def test_service_unit(hosts, tmp_path):
    _, _, state = hosts
    out = run_install("--service", "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0, out.stderr
    unit = (tmp_path / ".config" / "systemd" / "user" / "lora-daemon.service").read_text()
    assert f"-m daemon serve --state-dir {state}" in unit and "ExecStart=" in unit
    run_install("--uninstall", "--state-dir", str(state), home=tmp_path)
    assert not (tmp_path / ".config" / "systemd" / "user" / "lora-daemon.service").exists()
