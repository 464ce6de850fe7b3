"""install.py against fake WebUI and ComfyUI trees: links, records, idempotence, the daemon, undo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from install_helpers import REPO, install_module, run_install, stand_in_venv


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
    link_w, link_c = webui / "extensions" / "lora-daemon", comfy / "custom_nodes" / "lora_daemon"
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
    pack = comfy / "custom_nodes" / "lora_daemon"
    assert "comfyui: copied" in out.stdout and pack.is_dir() and not pack.is_symlink()
    assert json.loads((pack / ".lora-daemon-copy").read_text())["repo"] == str(REPO)
    daemon = DaemonProcess(state, [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    monkeypatch.setenv("LORA_DAEMON_HOME", str(state))
    host = ComfyHost(comfy, pack=pack).install()
    try:
        assert host.pack.thin.REPO_ROOT == REPO
        (host.checkpoints / "tiny.safetensors").symlink_to(tiny_sd["safetensors"])
        node = host.pack.NODE_CLASS_MAPPINGS["LoraDaemonTrainLoRA"]
        _, _, name, job_id, _ = node().train(
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


def test_the_comfyui_install_uses_the_documented_name_and_the_example_workflow_finds_its_data(tmp_path, tiny_sd):
    """`install.py --comfyui` links the pack under the name docs/comfyui.md and the shipped example
    workflow use; the example's data set path then exists and the Train LoRA node accepts its inputs."""
    from comfy_host import HOST_MODULES, STANDINS, load_like_comfyui

    comfy, state = make_comfyui(tmp_path / "ComfyUI"), tmp_path / "state"
    out = run_install("--comfyui", str(comfy), "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    link = comfy / "custom_nodes" / install_module().LINK_NAMES["comfyui"]
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


def test_the_suite_runs_in_parallel_unless_the_command_line_says_otherwise(monkeypatch):
    install = install_module()
    monkeypatch.setattr(install.os, "cpu_count", lambda: 2)
    assert install.test_workers(["-q"]) == ["-n", "3", "--dist", "loadfile"]
    monkeypatch.setattr(install.os, "cpu_count", lambda: 64)
    assert install.test_workers([]) == ["-n", "8", "--dist", "loadfile"]
    for own in (["-n", "1"], ["-n0"], ["--numprocesses=2"], ["-p", "no:xdist"]):
        assert install.test_workers(["-q", *own]) == [], own
