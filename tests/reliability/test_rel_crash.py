"""SIGKILL the daemon at many moments of a job's life and start it again each time.

Moments: a job just queued, a worker loading, training between steps, in the middle of a checkpoint
save, of the export into output_dir, and of the deploy into a Lora folder. The last four are held
open with the test-only fault hook (shared/faults.py: the worker sleeps right there and writes a
mark file), so the kill lands exactly in them. After every kill: the worker is gone, no job is
missing, and every *.safetensors in the output and Lora folders opens whole (a killed writer may
leave only hidden `.name.XXXXXXXX.tmp` files, which the next start deletes). At the end every job
has finished (a re-run resumes from the newest training state), or failed with a reason, and every
LoRA exists exactly once in its output folder and in the Lora folder (a re-run completes what the
killed attempt began, under the same names).

RELIABILITY_CRASH_ROUNDS (default 20) and RELIABILITY_SEED change the number and order of kills.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import count, scan_folder
from daemon_harness import DaemonProcess, pid_alive, wait_until

from shared.faults import FAULT_ENV, MARK_ENV

HOLD = "sleep:300"  # a worker held at a moment waits there until the daemon is killed
FAULTS = {
    "queued": f"load={HOLD}",  # nothing runs: the kill lands on jobs waiting in the queue
    "loading": "load=sleep:0",  # marks the worker's start; the kill follows 0.3-3 s later, mid-import or mid-load
    "training": f"step={HOLD}",  # after the attempt's first step (a resumed run skips the ones it has)
    "checkpoint": f"write@checkpoints/*-step000004.safetensors={HOLD}",  # the second save: the first must survive
    "export": f"write@out-*/*.safetensors={HOLD}",
    "deploy": f"write@Lora/*.safetensors={HOLD}",
}
# cheap moments (no model loaded) come up more often, so 20 kills fit the CI time budget
CYCLE = ["queued", "loading", "training", "checkpoint", "queued", "loading", "export", "deploy", "queued", "loading"]
TRAIN_JOBS = 1  # re-run after every kill; the queued rounds add more jobs behind it


def moments(rounds: int, seed: int) -> list[str]:
    plan = [CYCLE[i % len(CYCLE)] for i in range(rounds)]
    random.Random(seed).shuffle(plan)
    return plan


def sd_job(tiny_sd, images: Path, root: Path, n: int) -> dict:
    return {
        "base_model": str(tiny_sd["safetensors"]), "model_config": str(tiny_sd["config"]),
        "train_data_dir": str(images), "output_dir": str(root / "exports" / f"out-job{n}"),
        "output_name": f"job{n}", "deploy_dir": str(root / "Lora"), "resolution": 64, "batch_size": 2,
        "max_train_steps": 6, "save_steps": 2, "learning_rate": 1e-3, "seed": n,
    }


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path, tmp_path_factory, tiny_sd, record):
    from shared.fixtures.images import make_image_folder

    rounds, seed = count("CRASH_ROUNDS", 20), count("SEED", 12)
    rng = random.Random(seed)
    images = make_image_folder(tmp_path / "images", count=4)
    marks = tmp_path / "marks"
    marks.mkdir()
    folders = [tmp_path / "exports", tmp_path / "Lora"]
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path])
    daemon.env = {MARK_ENV: str(marks)}
    submitted: list[str] = []
    train_jobs = list(range(TRAIN_JOBS))  # the numbers of the jobs that train (the others are dry runs)
    kills: Counter = Counter()
    partial, visible_temps, temps_after_kill, checkpoints_checked = [], [], 0, 0

    try:
        daemon.start()
        with daemon.client() as client:
            for n in range(TRAIN_JOBS):
                submitted.append(client.submit(sd_job(tiny_sd, images, tmp_path, n), source=f"job{n}")["id"])
        daemon.stop()

        for moment in moments(rounds, seed):
            for mark in marks.iterdir():
                mark.unlink()
            if moment == "checkpoint":  # a resumed run would skip the save to interrupt: start it afresh
                for state in (tmp_path / "exports").glob("*/checkpoints/state-step*"):
                    shutil.rmtree(state)
            daemon.env[FAULT_ENV] = FAULTS[moment]
            daemon.start()
            with daemon.client() as client:
                listed = {j["id"] for j in client.jobs(limit=10_000)}
                assert listed == set(submitted), f"jobs went missing: {set(submitted) - listed}"
                n = train_jobs[-1]
                exported = tmp_path / "exports" / f"out-job{n}" / f"job{n}.safetensors"
                deployed = tmp_path / "Lora" / f"job{n}.safetensors"  # the last file a job publishes
                passed = {"training": deployed, "checkpoint": deployed, "export": exported, "deploy": deployed}
                if moment in passed and passed[moment].exists():
                    # a job's outputs are written once: a re-run never trains or exports again what it
                    # published, so this moment needs a job that has not reached it yet
                    n = len(submitted)
                    submitted.append(client.submit(sd_job(tiny_sd, images, tmp_path, n), source=f"job{n}")["id"])
                    train_jobs.append(n)
                if moment == "queued":  # one more job, killed right after the daemon said "queued"
                    job = client.submit({**sd_job(tiny_sd, images, tmp_path, len(submitted)),
                                         "max_train_steps": 2, "save_steps": 0}, dry_run=True,
                                        source=f"job{len(submitted)}")
                    submitted.append(job["id"])
                    assert job["state"] == "queued"
                    worker = None
                else:
                    mark = wait_until(lambda: next(marks.iterdir(), None), 180, f"a worker to reach {moment}")
                    worker = int(mark.name.rsplit(".", 1)[1])
                    if moment == "loading":
                        time.sleep(rng.uniform(0.3, 3.0))
            daemon.kill()
            kills[moment] += 1
            if worker:
                wait_until(lambda w=worker: not pid_alive(w), 20, "the worker to exit with its daemon")
            for folder in folders:
                seen = scan_folder(folder)
                partial += seen["partial"] + seen["orphan_sidecars"]
                visible_temps += seen["visible_temporaries"]
                temps_after_kill += len(seen["hidden_temporaries"])
            if moment == "checkpoint":  # the save before the one cut short is whole and loadable
                earlier = list((tmp_path / "exports").glob("*/checkpoints/*-step000002.safetensors"))
                assert earlier and all(scan_folder(p.parent)["partial"] == [] for p in earlier)
                checkpoints_checked += 1

        daemon.env.pop(FAULT_ENV)
        start = time.monotonic()
        daemon.start()
        with daemon.client(timeout=300) as client:
            final = {}
            for job_id in submitted:
                for _event in client.follow(job_id):
                    pass
                final[job_id] = client.get(job_id)
            listed = {j["id"] for j in client.jobs(limit=10_000)}
            removed = 0
            for job_id in submitted:
                client.subscribe(job_id)
            events: dict[str, list[dict]] = {}
            deadline = time.monotonic() + 60
            total = sum(j["last_seq"] for j in final.values())
            for event in client.events(timeout=60):
                events.setdefault(event["job"], []).append(event)
                if sum(map(len, events.values())) >= total or time.monotonic() > deadline:
                    break
        finish_s = time.monotonic() - start
    finally:
        daemon.stop()

    for job_events in events.values():
        for event in job_events:
            if event["kind"] == "interrupted":
                removed += len(event["data"].get("removed_temporaries", []))
    end_scan = [scan_folder(folder) for folder in folders]
    lost = len(set(submitted) - listed)
    finished = sum(j["state"] == "finished" for j in final.values())
    failed_with_reason = sum(j["state"] == "failed" and bool(j["error"]) for j in final.values())
    record("crash", faults_injected=sum(kills.values()), by_moment=dict(kills), seed=seed,
           survived=sum(kills.values()) if lost == 0 else 0, jobs=len(submitted), jobs_lost=lost,
           jobs_finished=finished, jobs_failed_with_reason=failed_with_reason,
           partial_files_seen=len(partial) + sum(len(s["partial"]) for s in end_scan),
           visible_temporaries_seen=len(visible_temps),
           hidden_temporaries_left_by_kills=temps_after_kill, temporaries_removed_at_restart=removed,
           hidden_temporaries_at_end=sum(len(s["hidden_temporaries"]) for s in end_scan),
           earlier_checkpoint_loadable=checkpoints_checked, finish_after_last_restart_s=round(finish_s, 1))

    assert lost == 0
    assert partial == [] and visible_temps == [], (partial, visible_temps)
    assert all(s["partial"] == s["orphan_sidecars"] == s["hidden_temporaries"] == [] for s in end_scan), end_scan
    assert finished + failed_with_reason == len(submitted), {k: (j["state"], j["error"]) for k, j in final.items()}
    assert finished == len(submitted), {k: (j["state"], j["error"]) for k, j in final.items()}
    # every event of every job arrived once and in order, across all the restarts
    for job_id, job in final.items():
        assert [e["seq"] for e in events[job_id]] == list(range(1, job["last_seq"] + 1))
    # a kill during a write left a hidden temporary, and the restart removed it
    if kills["checkpoint"] + kills["export"] + kills["deploy"]:
        assert temps_after_kill > 0 and removed == temps_after_kill
    # every training job's LoRA exactly once: in its output folder and in the Lora folder, never a
    # second copy (`job0_2`) from a re-run after a kill
    lora = sorted(p.name for p in (tmp_path / "Lora").iterdir())
    assert lora == sorted(f"job{n}{s}" for n in train_jobs for s in (".json", ".preview.png", ".safetensors")), lora
    for n in train_jobs:
        out = sorted(p.name for p in (tmp_path / "exports" / f"out-job{n}").iterdir() if p.is_file())
        assert [name for name in out if name.endswith(".safetensors")] == [f"job{n}.safetensors"], out
