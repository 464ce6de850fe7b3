"""A job that runs out of memory is retried once by the daemon with the next cheaper plan its trainer
named (shared/training/memory.py, daemon/jobs.py), says so in its events, and is never lost.

The out-of-memory is Python's MemoryError raised at a step's progress report (shared/faults.py)."""

from __future__ import annotations

import pytest
import yaml
from daemon_harness import DaemonProcess, collect


def start_daemon(tmp_path, tmp_path_factory, fault: str) -> DaemonProcess:
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path])
    marks = tmp_path / "marks"
    marks.mkdir()
    proc.env = {"LORA_DAEMON_FAULT": fault, "LORA_DAEMON_FAULT_MARK": str(marks)}
    return proc.start()


# 256 px, latents cached, no preview: the UNet's backward is what the levers change (at 64 px every
# plan of the tiny model is within a MiB of the others, and the planner names no cheaper one)
LEVERED = {"resolution": 256, "cache_latents": "memory", "preview": False}


def submit(client, config):
    return client.submit(yaml.safe_load(config.read_text()), base_dir=config.parent, source=str(config))


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


@pytest.mark.slow
def test_an_out_of_memory_job_resumes_its_saved_state_with_the_next_plan_that_keeps_its_batch(
        tmp_path, tmp_path_factory, sd_config):
    daemon = start_daemon(tmp_path, tmp_path_factory, "step@3=memoryerror+once")
    try:
        config = sd_config(max_train_steps=4, save_steps=2, output_name="lean", **LEVERED)
        with daemon.client() as client:
            job = submit(client, config)
            events = collect(client, job["id"])
            final = client.get(job["id"])
    finally:
        daemon.stop()
    assert final["state"] == "finished", events[-1]
    assert kinds(events).count("memory_retry") == 1 and "failed" not in kinds(events)
    first_plan, second_plan = (e["data"] for e in events if e["kind"] == "memory_plan")
    retry = next(e["data"] for e in events if e["kind"] == "memory_retry")
    # the first run saved a state at step 2: the retry keeps its micro-batch and continues from it
    assert retry["resume"] is True and "out of memory" in retry["reason"]
    target = first_plan["next_keeping_batch"]
    assert retry["to"]["settings"] == target["settings"] and retry["to"]["estimate_gb"] < first_plan["estimate_gb"]
    assert target["settings"]["batch_size"] == first_plan["settings"]["batch_size"] == 2
    assert target["settings"]["gradient_checkpointing"] is True  # the one lever left that keeps batch 2
    assert second_plan["settings"] == target["settings"]  # the re-run runs the plan the retry named
    started = [e["data"] for e in events if e["kind"] == "started"]
    assert [s["step"] for s in started] == [0, 2] and started[1]["resumed"] is True
    progress_after = [e["data"]["step"] for e in events[events.index(next(e for e in events if e["kind"] == "memory_retry")):]
                      if e["kind"] == "progress"]
    assert progress_after == [3, 4]
    assert final["attempts"] == 2 and final["spec"]["config"]["gradient_checkpointing"] is True
    assert (tmp_path / "out" / "my_lora" / "lean.safetensors").is_file()


@pytest.mark.slow
def test_a_job_out_of_memory_twice_fails_once_retried_and_stays_in_the_queue_history(
        tmp_path, tmp_path_factory, sd_config):
    daemon = start_daemon(tmp_path, tmp_path_factory, "step@1=memoryerror")
    try:
        config = sd_config(max_train_steps=2, output_name="heavy", **LEVERED)
        with daemon.client() as client:
            job = submit(client, config)
            events = collect(client, job["id"])
            final = client.get(job["id"])
            listed = {j["id"] for j in client.jobs()}
    finally:
        daemon.stop()
    assert kinds(events).count("memory_retry") == 1 and kinds(events)[-1] == "failed"
    first_plan = next(e["data"] for e in events if e["kind"] == "memory_plan")
    retry = next(e["data"] for e in events if e["kind"] == "memory_retry")
    # no state was saved: the retry may change the micro-batch; the fastest cheaper plan does
    assert retry["resume"] is False and retry["to"]["settings"] == first_plan["next"]["settings"]
    assert retry["to"]["settings"]["batch_size"] == 1 and retry["to"]["settings"]["gradient_accumulation_steps"] == 2
    assert events[-1]["data"]["cause"] == "out_of_memory"
    assert final["state"] == "failed" and final["attempts"] == 2 and job["id"] in listed
