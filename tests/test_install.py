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


def stand_in_venv(folder: Path, python_script: str | None = None) -> Path:
    """The daemon's environment as install.py finds it up to date (its stamp names this checkout), with
    a `bin/python` that runs the test's own Python: install.py then creates and pip-installs nothing,
    whichever checkout (or worktree) the tests run from."""
    sys.path.insert(0, str(REPO))
    try:
        import install
    finally:
        sys.path.remove(str(REPO))
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    python = folder / "bin" / "python"
    python.write_text(python_script or f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / install.STAMP).write_text(f"{install._wanted_state('[dev]')}\n")
    return folder


VENV = stand_in_venv(REPO / "build" / "test-venv")  # the daemon's own environment, for install.py


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
    link_w, link_c = webui / "extensions" / "lora-daemon", comfy / "custom_nodes" / "lora_daemon"
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

    # the extensions' path: the node pack, loaded from the link as ComfyUI loads it, finds no daemon
    # and starts one from the environment install.py recorded
    from comfy_host import load_like_comfyui
    from daemon_harness import free_port

    (state / "config.yaml").write_text(f"port: {free_port()}\n")
    pack = load_like_comfyui(comfy / "custom_nodes" / "lora_daemon")
    daemon_job = sys.modules[pack.__name__ + ".daemon_job"]
    client = daemon_job.connect(state)
    pid = json.loads((state / "daemon.json").read_text())["pid"]
    try:
        info = client.info()
        client.close()
        assert info["version"] and (state / "daemon.log").is_file()
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


def test_the_comfyui_install_uses_the_documented_name_and_the_example_workflow_finds_its_data(tmp_path, tiny_sd):
    """`install.py --comfyui` links the pack under the name docs/comfyui.md and the shipped example
    workflow use; the example's data set path then exists and the Train LoRA node accepts its inputs."""
    from comfy_host import HOST_MODULES, STANDINS, load_like_comfyui

    comfy, state = make_comfyui(tmp_path / "ComfyUI"), tmp_path / "state"
    out = run_install("--comfyui", str(comfy), "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    import install  # the repository root is on sys.path (tests/conftest.py)

    link = comfy / "custom_nodes" / install.LINK_NAMES["comfyui"]
    assert link.is_symlink() and f"custom_nodes/{link.name}" in (REPO / "docs" / "comfyui.md").read_text()

    workflow = json.loads((REPO / "docs" / "comfyui_workflow_api.json").read_text())
    train = next(n["inputs"] for n in workflow.values() if n["class_type"] == "LoraDaemonTrainLoRA")
    sys.path.insert(0, str(STANDINS))  # ComfyUI's own modules, as the pack finds them inside ComfyUI
    try:
        import folder_paths

        folder_paths.configure(str(comfy))
        (comfy / "models" / "checkpoints" / train["checkpoint"]).symlink_to(tiny_sd["safetensors"])
        pack = load_like_comfyui(link)
        plan = pack.train_node.TrainPlan(**{k: v for k, v in train.items()
                                            if not isinstance(v, list) and k not in ("strength_model", "strength_clip")})
    finally:
        sys.path.remove(str(STANDINS))
        for name in [m for m in sys.modules if m in HOST_MODULES or m.startswith(str(link).replace(".", "_x_"))]:
            del sys.modules[name]
    assert plan.dataset == (REPO / "shared" / "demo" / "images").resolve()
    assert (plan.dataset / "metadata.csv").is_file()


def test_an_install_under_the_old_comfyui_name_is_moved(hosts, tmp_path):
    _, comfy, state = hosts
    old = comfy / "custom_nodes" / "lora-daemon"  # what install.py made before the name was unified
    old.symlink_to(REPO / "comfy_nodes", target_is_directory=True)
    state.mkdir()
    (state / "install.json").write_text(json.dumps({"hosts": {"comfyui": {
        "path": str(comfy), "link": str(old), "lora_dir": str(comfy / "models" / "loras")}}}))
    out = run_install("--comfyui", str(comfy), "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    assert not old.exists() and (comfy / "custom_nodes" / "lora_daemon").is_symlink()
    assert json.loads((state / "install.json").read_text())["hosts"]["comfyui"]["link"] == \
        str(comfy / "custom_nodes" / "lora_daemon")


def test_the_demo_leaves_nothing_outside_the_checkout(tmp_path):
    """`install.py --demo` runs the demo (its daemon keeps its state in demo_output/) and records nothing
    in the user's own state folder. The stand-in environment's Python notes the demo command it got."""
    calls = tmp_path / "calls"
    venv = stand_in_venv(tmp_path / "venv", python_script=f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    for key in ("LORA_DAEMON_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, str(REPO / "install.py"), "--venv", str(venv), "--demo"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert calls.read_text().splitlines() == ["-m daemon demo"]
    assert list(home.iterdir()) == []  # no ~/.local/state/lora-daemon/install.json, nothing else
