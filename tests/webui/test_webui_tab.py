"""The Train LoRA tab in a real browser: real gradio 3.41.2 (its own environment, no torch), the
stand-in WebUI modules, a real daemon started from the tab, training the tiny SD model on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from daemon_harness import DaemonProcess, free_port, pid_alive, wait_until
from install_helpers import run_install
from webui_env import FAKE_WEBUI, HERE, REPO, gradio3_python, make_webui_root, webui_env

from shared.client import endpoint_path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_tab_builds_without_torch_in_the_webui_python(tmp_path, tiny_sd):
    python = gradio3_python()
    root = make_webui_root(tmp_path / "webui", tiny_sd["safetensors"], {})
    log = tmp_path / "calls.jsonl"
    out = subprocess.run([python, str(FAKE_WEBUI / "webui.py"), "--build-only"], cwd=root, env=webui_env(root, log),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TABS ['Train LoRA']" in out.stdout, out.stdout + out.stderr
    assert "could not load" not in out.stdout + out.stderr
    for key in ("lora_daemon_state_dir", "lora_daemon_autostart", "lora_daemon_free_vram", "lora_daemon_deploy_dir"):
        assert key in out.stdout
    install = [c for c in read_log(log) if c["call"] == "install.py"]
    assert install == [{**install[0], "returncode": 0}]  # websockets is there: nothing to install
    assert not [c for c in read_log(log) if c["call"] == "run_pip"]


@pytest.mark.slow
def test_train_from_the_tab_in_a_browser(tmp_path, tmp_path_factory, tiny_sd, image_dir):
    python = gradio3_python()
    state = tmp_path / "state"
    state.mkdir()
    daemon_port = free_port()
    (state / "config.yaml").write_text(yaml.safe_dump({
        "port": daemon_port, "read_roots": [str(tmp_path_factory.getbasetemp())], "write_roots": [str(tmp_path)]}))
    # the daemon's environment is this test's Python; PYTHONPATH points it at this checkout
    daemon_python = tmp_path / "daemon-python"
    daemon_python.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" OMP_NUM_THREADS=1 exec "{sys.executable}" "$@"\n')
    daemon_python.chmod(0o755)
    root = make_webui_root(tmp_path / "webui", tiny_sd["safetensors"], {
        "sd_model_checkpoint": tiny_sd["safetensors"].name,
        "lora_daemon_state_dir": str(state),
        "lora_daemon_python": str(daemon_python),
        "lora_daemon_autostart": False,  # so the tab has to offer the Start button
        "lora_daemon_free_vram": True,
    })
    lora_dir = root / "models" / "Lora"
    log = tmp_path / "calls.jsonl"
    port = free_port()
    webui_out = tmp_path / "webui.out"
    load_flag = tmp_path / "load-the-model-now"  # the WebUI hashes the checkpoint only after the page loaded
    with open(webui_out, "w") as out:  # a file, not a pipe: nobody reads it while the test runs
        webui = subprocess.Popen([python, str(FAKE_WEBUI / "webui.py"), "--port", str(port)], cwd=root,
                                 env={**webui_env(root, log), "FAKE_WEBUI_LOAD_MODEL_WHEN": str(load_flag)},
                                 stdout=out, stderr=subprocess.STDOUT)
    shots = [str(tmp_path / "webui_tab.png")]
    if os.environ.get("LORA_WEBUI_SCREENSHOT"):
        shots.append(str(REPO / "docs" / "images" / "webui_tab.png"))
    try:
        def ready():
            assert webui.poll() is None, f"the stand-in WebUI exited at start:\n{webui_out.read_text()[-3000:]}"
            return "READY http" in webui_out.read_text()

        wait_until(ready, 90, "the stand-in WebUI to serve", interval=0.2)
        advanced = yaml.safe_dump({"model_config": str(tiny_sd["config"]), "max_train_steps": 30, "save_steps": 0,
                                   "seed": 0})
        long_advanced = yaml.safe_dump({"model_config": str(tiny_sd["config"]), "max_train_steps": 3000,
                                        "save_steps": 0})
        drive = subprocess.run(
            [python, str(HERE / "drive_tab.py"), "--url", f"http://127.0.0.1:{port}/", "--out", str(tmp_path),
             "--dataset", str(image_dir), "--output-name", "webui_test", "--advanced", advanced,
             *[a for shot in shots for a in ("--screenshot", shot)],
             "--then", "stop", "--then", "cancel", "--long-advanced", long_advanced,
             "--load-model-flag", str(load_flag)],
            capture_output=True, text=True, timeout=400, env=webui_env(root, log))
        assert drive.returncode == 0, drive.stdout[-3000:] + drive.stderr[-3000:] + webui_out.read_text()[-3000:]
        seen = json.loads(drive.stdout.strip().splitlines()[-1])

        # the daemon the tab started exits while the WebUI runs on: the WebUI reaps it (no zombie)
        daemon_pid = json.loads(endpoint_path(state).read_text())["pid"]
        os.kill(daemon_pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{daemon_pid}").exists(), 30,
                   "the WebUI to reap the daemon it started (it stays a zombie otherwise)", interval=0.2)
    finally:
        webui.send_signal(signal.SIGTERM)
        try:
            webui.wait(15)
        except subprocess.TimeoutExpired:
            webui.kill()
        try:
            daemon_pid = json.loads(endpoint_path(state).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            daemon_pid = None
        if daemon_pid and pid_alive(daemon_pid):
            os.kill(daemon_pid, signal.SIGTERM)
            wait_until(lambda: not pid_alive(daemon_pid), 20, "the daemon the tab started to exit")

    # before: no daemon, and the tab says so and offers to start it; the base model is the WebUI's
    assert "No lora-daemon is running" in seen["no_daemon"] and seen["start_visible"] is True
    # the page was loaded before the WebUI hashed the checkpoint: it holds the old title and trains with
    # it (the tab finds the file as the WebUI does); Reload list and a page reload show the new title
    name = tiny_sd["safetensors"].name
    assert seen["base_model_default"] == seen["base_model_when_trained"] == name
    assert seen["base_model_after_reload_list"].startswith(name + " [")
    assert seen["base_model_after_page_reload"] == seen["base_model_after_reload_list"]
    assert "Daemon running: lora-daemon" in seen["daemon_up"] and seen["start_visible_after"] is False
    # during: the progress moved, and a screenshot was taken mid-training with a loss curve
    steps = seen["steps"]
    assert len(set(steps)) >= 2 and steps == sorted(steps), seen["progress"]
    assert steps[-1] == 30
    assert seen["screenshot_taken"] and seen["loss_curve_shown"], seen
    assert Path(shots[0]).stat().st_size > 10_000
    assert "it/s" in seen["shot_progress"] and "loss " in seen["shot_progress"]
    # the status line counts the job while it runs (it was read once, before the job, and said 0)
    assert any("1 running" in line for line in seen["status_while_running"]), seen["status_while_running"]
    # after: the prompt text, the file in the WebUI's Lora folder, the queue lists the job
    assert seen["result"] == "<lora:webui_test:0.8>", seen
    assert "finished" in seen["final_progress"] and "step 30/30" in seen["final_progress"]
    # the evaluation at the end: its scores (and any warning) and the report, offered for download
    assert "effect " in seen["evidence"] and "collapse " in seen["evidence"], seen["evidence"]
    assert "Report: " in seen["evidence"] and "report.html" in seen["evidence"] and seen["report_offered"]
    assert "webui_test" in seen["queue"] and "finished" in seen["queue"]
    # the card is in the Lora tab of the open page and of a page loaded afterwards, without refresh
    assert seen["cards_at_start"] == []
    cards = {k: seen[k] for k in ("cards_at_start", "cards_open_page", "cards_fresh_page")}
    assert "webui_test" in seen["cards_open_page"] and "webui_test" in seen["cards_fresh_page"], cards

    # Stop saves what was trained, under a new name beside the first; Cancel keeps nothing
    stopped, cancelled = seen["stop"], seen["cancel"]
    # after a page reload, Refresh found the running job and streamed it again
    assert seen["job_box_after_reload"] == "" and seen["reattached"]["job"] == seen["reattached"]["running_job"]
    assert seen["reattached"]["job"] == stopped["job"] and "running · step" in seen["reattached"]["progress"]
    assert stopped["job"] != stopped["previous_job"] and cancelled["job"] != cancelled["previous_job"]
    assert "stopped early; saved" in stopped["progress"], stopped
    assert int(re.search(r"step (\d+)/3000", stopped["progress"]).group(1)) < 3000
    assert stopped["result"] == "<lora:webui_test_2:0.8>"
    assert "cancelled" in cancelled["progress"] and cancelled["result"] == ""
    assert sorted(p.name for p in lora_dir.iterdir()) == ["webui_test.json", "webui_test.preview.png",
                                                         "webui_test.safetensors", "webui_test_2.json",
                                                         "webui_test_2.preview.png", "webui_test_2.safetensors"]

    # the WebUI side: the model left the GPU before the job and came back after, under the queue
    # lock each time, and the Lora list was refreshed once the file was there
    calls = read_log(log)
    names = [c["call"] for c in calls]
    assert "unload_model_weights_without_model" not in names
    unload, back = names.index("unload_model_weights"), names.index("send_model_to_device")
    refreshes = [c["names"] for c in calls if c["call"] == "list_available_networks"]
    assert unload < back and calls[unload]["lock_held"] and calls[back]["lock_held"]
    assert refreshes[0] == [] and ["webui_test"] in refreshes and refreshes[-1] == ["webui_test", "webui_test_2"]
    assert refreshes == sorted(refreshes, key=len)  # never a LoRA lost from the list
    # one unload and one return per job (three jobs), alternating
    moves = [c["call"] for c in calls if c["call"] in ("unload_model_weights", "send_model_to_device")]
    assert moves == ["unload_model_weights", "send_model_to_device"] * 3
    assert all(c["lock_held"] for c in calls if c["call"] in ("unload_model_weights", "send_model_to_device"))
    assert calls[unload]["device"] == "cpu" and calls[back]["device"] == "cuda"
    if os.environ.get("LORA_WEBUI_SCREENSHOT"):
        shutil.copy(tmp_path / "webui_tab_done.png", REPO / "docs" / "images" / "webui_tab_done.png")


def other_extension(root: Path, name: str) -> Path:
    """An extension that ships its own top-level `shared` package and imports it from its folder (the
    WebUI puts the folder on sys.path while the extension's scripts load)."""
    ext = root / "extensions" / name
    (ext / "scripts").mkdir(parents=True)
    (ext / "shared").mkdir()
    (ext / "shared" / "__init__.py").write_text("WHO = 'other extension'\n")
    (ext / "shared" / "late.py").write_text("def hello():\n    return 'other extension works'\n")
    (ext / "scripts" / "other_tab.py").write_text(textwrap.dedent("""
        import shared
        from modules import script_callbacks

        assert shared.WHO == "other extension", shared


        def on_ui_tabs():
            import gradio as gr
            import shared.late  # when the tabs are built, after every extension has loaded

            with gr.Blocks(analytics_enabled=False) as tab:
                gr.Markdown(shared.late.hello(), elem_id="other_tab_text")
            return [(tab, "Other", "other")]


        script_callbacks.on_ui_tabs(on_ui_tabs)
    """))
    return ext


def run_driver(python: str, root: Path, log: Path, *args: str) -> dict:
    out = subprocess.run([python, str(HERE / "tab_driver.py"), *args], cwd=root, env=webui_env(root, log),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["aaa-other", "zzz-other", None], ids=["other-first", "ours-first", "ours-alone"])
def test_an_extension_with_its_own_top_level_shared_works_beside_ours(tmp_path, tiny_sd, name):
    """The WebUI loads extensions in folder order; in either order both tabs build, the other
    extension's `shared` is the only one in sys.modules, and ours never registers `shared` or `daemon`
    (alone either)."""
    python = gradio3_python()
    root = make_webui_root(tmp_path / "webui", tiny_sd["safetensors"], {})
    if name is None:
        seen = run_driver(python, root, tmp_path / "calls.jsonl")
        assert seen["tabs"] == ["Train LoRA"] and seen["modules"] == {}
        return
    other = other_extension(root, name)
    seen = run_driver(python, root, tmp_path / "calls.jsonl")
    ours_first = name > "lora-daemon"
    assert seen["tabs"] == (["Train LoRA", "Other"] if ours_first else ["Other", "Train LoRA"])
    assert seen["other_tab"] == "other extension works"
    assert seen["modules"] == {"shared": str(other / "shared" / "__init__.py"),
                               "shared.late": str(other / "shared" / "late.py")}


@pytest.mark.slow
def test_a_copied_install_of_the_tab_finds_the_checkout_and_trains_a_job(tmp_path, tmp_path_factory, tiny_sd,
                                                                         image_dir):
    """Where links cannot be made install.py copies the extension; the copy finds this checkout through its
    marker, and Train (pressed with the fields as the page builds them) trains through the daemon."""
    python = gradio3_python()
    state = tmp_path / "state"
    root = make_webui_root(tmp_path / "webui", tiny_sd["safetensors"], {
        "sd_model_checkpoint": tiny_sd["safetensors"].name, "lora_daemon_state_dir": str(state),
        "lora_daemon_autostart": False})
    (root / "extensions" / "lora-daemon").unlink()
    (root / "webui.py").write_text("# AUTOMATIC1111\n")
    out = run_install("--copy", "--webui", str(root), "--state-dir", str(state), home=tmp_path)
    assert out.returncode == 0 and "webui: copied" in out.stdout, out.stderr + out.stdout
    copy = root / "extensions" / "lora-daemon"
    assert copy.is_dir() and not copy.is_symlink() and (copy / ".lora-daemon-copy").is_file()
    daemon = DaemonProcess(state, [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    try:
        seen = run_driver(python, root, tmp_path / "calls.jsonl", "--train", "--dataset", str(image_dir),
                          "--output-name", "copied_tab", "--set", "lora_rank=4", "--set", "lora_alpha=4",
                          "--set", "learning_rate=0.001", "--set", "batch_size=2", "--set", "resolution=64",
                          "--set", "max_train_steps=2",
                          "--advanced", f"model_config: {tiny_sd['config']}\nsave_steps: 0\n")
    finally:
        daemon.stop()
    assert seen["result"] == "<lora:copied_tab:0.8>", seen
    assert "finished" in seen["progress"] and seen["modules"] == {}
    assert (root / "models" / "Lora" / "copied_tab.safetensors").is_file()
