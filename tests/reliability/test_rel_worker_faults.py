"""Faults inside a job: its worker killed, out of memory in a step, the disk full during a save.

Each job ends failed with a cause a user can act on, the daemon stays up, and the next job in the
queue runs. The out-of-memory and full-disk errors are raised by the test-only fault hook
(shared/faults.py) exactly where a real one would come from: a training step, a file being saved.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import scan_folder
from daemon_harness import DaemonProcess, wait_until

from shared.faults import FAULT_ENV, MARK_ENV


def job(tiny_sd, images, root, name, **extra) -> dict:
    return {"base_model": str(tiny_sd["safetensors"]), "model_config": str(tiny_sd["config"]),
            "train_data_dir": str(images), "output_dir": str(root / "out" / name), "output_name": name,
            "resolution": 64, "batch_size": 2, "max_train_steps": 2, "save_steps": 0,
            "learning_rate": 1e-3, "seed": 0, **extra}


@pytest.mark.slow
def test_worker_faults_end_the_job_with_a_cause_and_the_queue_goes_on(tmp_path, tmp_path_factory, tiny_sd,
                                                                      record):
    from shared.fixtures.images import make_image_folder

    images = make_image_folder(tmp_path / "images", count=4)
    marks = tmp_path / "marks"
    marks.mkdir()
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path])
    daemon.env = {MARK_ENV: str(marks), FAULT_ENV: ";".join([
        "load@victim=sleep:300",  # held so the test can kill its worker
        "step@3=oom",  # only the oom job has a step 3
        "write@checkpoints/diskfull-*=enospc",  # the first checkpoint save of the diskfull job
    ])}
    daemon.start()
    try:
        with daemon.client(timeout=120) as client:
            ids = {
                "killed": client.submit(job(tiny_sd, images, tmp_path, "victim"))["id"],
                "oom": client.submit(job(tiny_sd, images, tmp_path, "oom", max_train_steps=4))["id"],
                "disk_full": client.submit(job(tiny_sd, images, tmp_path, "diskfull", save_steps=1))["id"],
                "next": client.submit(job(tiny_sd, images, tmp_path, "after"), dry_run=True)["id"],
            }
            mark = wait_until(lambda: next(marks.iterdir(), None), 120, "the victim's worker to start")
            os.kill(int(mark.name.rsplit(".", 1)[1]), signal.SIGKILL)
            final = {}
            for what, job_id in ids.items():
                for _event in client.follow(job_id):
                    pass
                final[what] = client.get(job_id)
            alive = daemon.proc.poll() is None and client.info()["type"] == "info"
    finally:
        daemon.stop()

    outputs = scan_folder(tmp_path / "out")
    causes = {what: (j["state"], j["error_cause"]) for what, j in final.items()}
    clear = {
        "killed": "was killed (SIGKILL" in (final["killed"]["error"] or ""),
        "oom": all(w in (final["oom"]["error"] or "") for w in ("out of GPU memory at step 3", "batch_size",
                                                                 "resolution", "gradient_checkpointing")),
        "disk_full": "disk is full" in (final["disk_full"]["error"] or "")
                     and "diskfull-step000001.safetensors" in final["disk_full"]["error"],
    }
    record("worker_faults", faults_injected=3, daemon_stayed_up=alive,
           survived=sum(clear.values()) if alive and final["next"]["state"] == "finished" else 0,
           causes={k: v[1] for k, v in causes.items() if k != "next"},
           messages={k: final[k]["error"] for k in clear}, next_job=final["next"]["state"],
           partial_files_seen=len(outputs["partial"]) + len(outputs["hidden_temporaries"]))

    assert alive
    assert causes == {"killed": ("failed", "crash"), "oom": ("failed", "out_of_memory"),
                      "disk_full": ("failed", "disk_full"), "next": ("finished", None)}, causes
    assert all(clear.values()), {k: final[k]["error"] for k in clear}
    assert all("\n" not in final[k]["error"] for k in clear)
    assert outputs["partial"] == [] and outputs["hidden_temporaries"] == [], outputs
    assert not (tmp_path / "out" / "diskfull" / "checkpoints").exists() or not any(
        (tmp_path / "out" / "diskfull" / "checkpoints").iterdir())
