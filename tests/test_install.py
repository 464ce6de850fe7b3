"""install.py against fake WebUI and ComfyUI trees: links, records, idempotence, the daemon, undo."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from install_helpers import REPO, run_install


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


@pytest.fixture
def hosts(tmp_path):
    return make_webui(tmp_path / "webui"), make_comfyui(tmp_path / "ComfyUI"), tmp_path / "state"


def test_install_twice_start_daemon_then_uninstall(hosts, tmp_path):
    webui, comfy, state = hosts
    before = snapshot(webui, comfy)
    args = ("--webui", str(webui), "--comfyui", str(comfy), "--state-dir", str(state))

    first = run_install(*args, home=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "Installing lora-daemon" not in first.stdout  # the stand-in environment is current
    link_w, link_c = webui / "extensions" / "lora-daemon", comfy / "custom_nodes" / "lora-daemon"
    assert link_w.is_symlink() and link_w.resolve() == (REPO / "extension_webui").resolve()
    assert link_c.is_symlink() and link_c.resolve() == (REPO / "comfy_nodes").resolve()
    record = json.loads((state / "install.json").read_text())
    venv = tmp_path / "daemon-venv"
    assert record["python"] == str(venv / "bin" / "python")
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
    pack = load_like_comfyui(comfy / "custom_nodes" / "lora-daemon")
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
    assert not (state / "install.json").exists() and venv.is_dir()  # not ours to remove: it existed


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


@pytest.mark.slow
def test_a_copied_comfyui_pack_finds_the_checkout_and_trains_a_job(hosts, tmp_path, tmp_path_factory, tiny_sd,
                                                                    image_dir, monkeypatch):
    """Where links cannot be made install.py copies the pack; the copy finds this checkout through its
    marker (not its own path), loads the thin client from it and trains through the daemon."""
    from comfy_host import ComfyHost
    from daemon_harness import DaemonProcess

    _, comfy, state = hosts
    out = run_install("--copy", "--comfyui", str(comfy), "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    pack = comfy / "custom_nodes" / "lora-daemon"
    assert "comfyui: copied" in out.stdout and pack.is_dir() and not pack.is_symlink()
    assert json.loads((pack / ".lora-daemon-copy").read_text())["repo"] == str(REPO)
    daemon = DaemonProcess(state, [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    monkeypatch.setenv("LORA_DAEMON_HOME", str(state))
    host = ComfyHost(comfy, pack=pack).install()
    try:
        assert host.pack.thin.REPO_ROOT == REPO
        (host.checkpoints / "tiny.safetensors").symlink_to(tiny_sd["safetensors"])
        node = host.pack.NODE_CLASS_MAPPINGS["LoraDaemonTrainLoRA"]
        _, _, name, job_id = node().train(
            checkpoint="tiny.safetensors", dataset_folder=str(image_dir), caption_source="metadata.csv",
            output_name="copied_pack", max_train_steps=2, epochs=1, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3,
            batch_size=2, resolution=64, training_seed=0,
            advanced=f"model_config: {tiny_sd['config']}\nsave_steps: 0\n")
        assert name == "copied_pack.safetensors" and (host.loras / name).is_file()
        with daemon.client() as client:
            assert client.get(job_id)["state"] == "finished"
    finally:
        host.uninstall()
        daemon.stop()
