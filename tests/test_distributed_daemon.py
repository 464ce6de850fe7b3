"""A daemon job with `num_processes: 2`: the worker runs `accelerate launch`, rank 0's events reach
the daemon as one stream, one file is deployed; stop reaches every rank and cancel kills them all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from daemon_harness import DaemonProcess, collect, pid_alive, wait_until


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    yield proc
    proc.stop()


def submit(client, config: Path) -> dict:
    return client.submit(yaml.safe_load(config.read_text()), base_dir=config.parent, source=str(config))


def job_processes(job_dir: Path) -> list[int]:
    """Processes working in the job's folder (the worker, accelerate launch and the ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(job_dir):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_two_process_job_streams_once_and_deploys_one_file(daemon, sd_config, tmp_path):
    lora_dir = tmp_path / "Lora"
    config = sd_config(num_processes=2, batch_size=2, max_train_steps=4, save_steps=2, output_name="ddp",
                       deploy_dir=lora_dir, device="cpu")
    with daemon.client() as client:
        job = submit(client, config)
        events = collect(client, job["id"])
        final = client.get(job["id"])
        log = client.logs(job["id"])["text"]
    assert final["state"] == "finished", log[-3000:]
    kinds = [e["kind"] for e in events if e["kind"] not in ("buckets", "cached")]
    assert kinds.count("started") == 1 and kinds[-1] == "finished"
    steps = [e["data"]["step"] for e in events if e["kind"] == "progress"]
    assert steps == [1, 2, 3, 4]  # one stream: rank 1's steps are not reported a second time
    assert [e["data"]["step"] for e in events if e["kind"] == "checkpoint"] == [2]
    assert "x 2 processes = effective batch 4" in log
    result = events[-1]["data"]
    assert result["steps"] == 4 and result["deployed"] == [str(lora_dir / "ddp.safetensors")]
    assert sorted(p.name for p in lora_dir.iterdir()) == ["ddp.json", "ddp.preview.png", "ddp.safetensors"]
    out = tmp_path / "out" / "my_lora"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ddp.safetensors"]


def test_stop_reaches_every_rank_and_cancel_kills_them_all(daemon, sd_config, tmp_path):
    long = dict(num_processes=2, batch_size=1, max_train_steps=500, save_steps=0, device="cpu",
                deploy_dir=tmp_path / "Lora")
    with daemon.client() as client:
        job = submit(client, sd_config(output_name="stopped", **long))
        first = collect(client, job["id"], until=lambda e: e["kind"] == "progress" and e["data"]["step"] >= 2)
        client.stop(job["id"])
        events = first + collect(client, job["id"], after=first[-1]["seq"])
        assert client.get(job["id"])["state"] == "finished"
        result = events[-1]["data"]
        steps = [e["data"]["step"] for e in events if e["kind"] == "progress"]
        assert result["stopped_early"] and result["steps"] == steps[-1] < 500
        assert steps == list(range(1, steps[-1] + 1))
        assert Path(result["deployed"][0]).is_file()

        job = submit(client, sd_config(output_name="cancelled", **long))
        collect(client, job["id"], until=lambda e: e["kind"] == "progress")
        job_dir = Path(client.get(job["id"])["job_dir"])
        running = job_processes(job_dir)
        assert len(running) >= 4  # worker, accelerate launch, two ranks
        client.cancel(job["id"])
        wait_until(lambda: not any(pid_alive(p) for p in running), 20, "every process of the job to exit")
        assert client.get(job["id"])["state"] == "cancelled"
    assert not (tmp_path / "Lora" / "cancelled.safetensors").exists()
