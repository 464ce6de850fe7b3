"""SIGKILL the daemon while a job trains: the worker goes with it, a restart runs the job to the end,
nothing partial appears in the Lora folder, and the job's history survives, numbered without gaps."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml
from daemon_harness import DaemonProcess, collect, pid_alive, wait_until


def test_job_survives_a_daemon_sigkill(tmp_path, tmp_path_factory, sd_config):
    lora_dir = tmp_path / "Lora"
    config = sd_config(max_train_steps=30, save_steps=5, output_name="survivor", deploy_dir=lora_dir)
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    try:
        with daemon.client() as client:
            job = client.submit(yaml.safe_load(config.read_text()), base_dir=config.parent, source=str(config))
            before = collect(client, job["id"], until=lambda e: e["kind"] == "checkpoint")
            worker_pid = client.get(job["id"])["pid"]

            # a second client follows across the crash; its library reconnects and resumes by seq
            followed: list[dict] = []
            follower = daemon.client()
            sub = threading.Thread(target=lambda: followed.extend(collect(follower, job["id"])))
            sub.start()

            daemon.kill()
            wait_until(lambda: not pid_alive(worker_pid), 15, "the orphaned worker to exit")
            assert not lora_dir.exists() or not any(lora_dir.iterdir())  # nothing deployed, nothing partial

            daemon.start()  # same state folder and port
            with daemon.client() as again:
                after = collect(again, job["id"], after=before[-1]["seq"])
                final = again.get(job["id"])
                full = collect(again, job["id"])  # the whole stored history, replayed
            sub.join(60)
            follower.close()
    finally:
        daemon.stop()

    assert final["state"] == "finished" and final["attempts"] == 2, final
    events = before + after
    assert [e["seq"] for e in events] == list(range(1, final["last_seq"] + 1))
    assert [e["seq"] for e in full] == [e["seq"] for e in events]
    assert [e["seq"] for e in followed] == [e["seq"] for e in events]

    kinds = [e["kind"] for e in events]
    interrupted = kinds.index("interrupted")
    assert kinds[interrupted + 1] == "queued" and events[interrupted + 1]["data"]["resume"] is True
    starts = [e["data"] for e in events if e["kind"] == "started"]
    assert [(s["attempt"], s["resumed"]) for s in starts] == [(1, False), (2, True)]
    # the second attempt continued from the checkpoint the first one saved, not from step 0
    saved = max(e["data"]["step"] for e in before if e["kind"] == "checkpoint")
    assert starts[0]["step"] == 0 and starts[1]["step"] >= saved >= 5
    second_run = [e["data"]["step"] for e in after if e["kind"] == "progress"]
    assert second_run[0] == starts[1]["step"] + 1 and second_run[-1] == 30
    assert kinds[-1] == "finished" and events[-1]["data"]["steps"] == 30

    # exactly one complete file in the Lora folder, named as reported
    assert sorted(p.name for p in lora_dir.iterdir()) == ["survivor.json", "survivor.preview.png", "survivor.safetensors"]
    assert events[-1]["data"]["lora_name"] == "survivor"
    log = (Path(final["job_dir"]) / "job.log").read_text()
    assert "--- attempt 1" in log and "--- attempt 2" in log


def test_a_rerun_without_a_saved_state_reports_that_it_started_again(tmp_path, tmp_path_factory, sd_config):
    """`resumed` says whether the trainer really continued: with no training state to continue from,
    the second attempt starts at step 0 and says so (resumed false)."""
    config = sd_config(max_train_steps=12, save_steps=0, output_name="again")
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    try:
        with daemon.client() as client:
            job = client.submit(yaml.safe_load(config.read_text()), base_dir=config.parent, source=str(config))
            before = collect(client, job["id"], until=lambda e: e["kind"] == "progress" and e["data"]["step"] >= 2)
        daemon.kill()
        daemon.start()
        with daemon.client() as again:
            after = collect(again, job["id"], after=before[-1]["seq"])
    finally:
        daemon.stop()
    starts = [e["data"] for e in before + after if e["kind"] == "started"]
    assert [(s["attempt"], s["step"], s["resumed"]) for s in starts] == [(1, 0, False), (2, 0, False)]
    assert after[-1]["kind"] == "finished" and after[-1]["data"]["steps"] == 12
