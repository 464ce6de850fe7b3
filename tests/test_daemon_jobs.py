"""The daemon end to end, as a real subprocess on loopback: submit, follow, deploy, stop, cancel, order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from daemon_harness import REPO, DaemonProcess, collect, pid_alive, wait_until

from shared.client import DaemonClient


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    # jobs may read anything the session's fixtures made and write only under this test's folder
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    yield proc
    proc.stop()


def cli_for(daemon):
    def cli(*args):
        return [sys.executable, "-m", "daemon", *args, "--state-dir", str(daemon.state_dir), "--port", str(daemon.port)]

    return cli


def submit_yaml(client: DaemonClient, config: Path, **fields) -> dict:
    data = yaml.safe_load(config.read_text())
    return client.submit(data, base_dir=config.parent, source=str(config), **fields)


def test_submit_follow_and_deploy_with_subscribers_that_miss_nothing(daemon, sd_config, tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    existing = lora_dir / "e2e.safetensors"  # someone's file with our name: must survive untouched
    existing.write_bytes(b"not ours")
    comfy_dir = tmp_path / "comfy_loras"  # a second host's folder, named in the request
    config = sd_config(max_train_steps=8, save_steps=4, output_name="e2e", deploy_dir=lora_dir)

    cli = cli_for(daemon)
    with daemon.client() as a, daemon.client() as b, daemon.client() as c:
        job = submit_yaml(a, config, deploy_dirs=[str(comfy_dir)])
        assert job["state"] == "queued" and job["name"] == "e2e"

        # b follows the whole job live; c drops its connection after a few events and comes back
        seen_b: list[dict] = []
        seen_c: list[dict] = []

        def follow_b():
            seen_b.extend(collect(b, job["id"]))

        def follow_c():
            first = collect(c, job["id"], until=lambda e: e["kind"] == "progress" and e["data"]["step"] >= 3)
            c.close()
            with daemon.client() as again:
                rest = collect(again, job["id"], after=first[-1]["seq"])
            seen_c.extend(first + rest)

        threads = [threading.Thread(target=follow_b), threading.Thread(target=follow_c)]
        for t in threads:
            t.start()
        cli_follow = subprocess.Popen(cli("follow", job["id"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        seen_a = collect(a, job["id"])
        for t in threads:
            t.join(120)
        final = a.get(job["id"])
        log = a.logs(job["id"])
    followed_out = cli_follow.communicate(timeout=60)[0]
    assert cli_follow.returncode == 0, followed_out
    assert "] 8/8 loss " in followed_out and "use it as <lora:e2e_2:0.8>" in followed_out
    status = subprocess.run(cli("status", job["id"]), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert "state:     finished" in status.stdout and "use as:    <lora:e2e_2:0.8>" in status.stdout

    assert final["state"] == "finished", final
    history = list(range(1, final["last_seq"] + 1))
    for seen in (seen_a, seen_b, seen_c):
        assert [e["seq"] for e in seen] == history  # every event, in order, none twice
    assert [e["kind"] for e in seen_a] == [e["kind"] for e in seen_b] == [e["kind"] for e in seen_c]
    kinds = [e["kind"] for e in seen_a if e["kind"] not in ("buckets", "cached")]  # SD data notes
    assert kinds[:3] == ["queued", "memory_plan", "started"] and kinds[-1] == "finished"
    assert kinds.count("progress") == 8 and kinds.count("checkpoint") == 1
    steps = [e["data"]["step"] for e in seen_a if e["kind"] == "progress"]
    assert steps == list(range(1, 9))
    first_progress = next(e for e in seen_a if e["kind"] == "progress")
    assert {"step", "total", "loss", "lr", "it_s", "eta_s"} <= set(first_progress["data"])

    # the result names the file as it landed: the existing e2e.safetensors was not overwritten
    result = seen_a[-1]["data"]
    assert result["lora_name"] == "e2e_2" and final["result"] == result
    deployed = Path(result["deployed"][0])
    assert deployed == lora_dir / "e2e_2.safetensors" and deployed.is_file()
    assert existing.read_bytes() == b"not ours"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["e2e.safetensors", "e2e_2.json", "e2e_2.preview.png",
                                                         "e2e_2.safetensors"]  # no temp files

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    state, _ = StableDiffusionPipeline.lora_state_dict(str(deployed))  # raises on keys it cannot map
    assert len(state) == 72 * 2
    with safe_open(str(deployed), "pt") as f:
        assert f.metadata()["ss_output_name"] == "e2e_2"
    # the copy in the second folder carries the name it got there
    assert result["deployed"][1] == str(comfy_dir / "e2e.safetensors")
    with safe_open(result["deployed"][1], "pt") as f, safe_open(str(deployed), "pt") as g:
        assert f.metadata()["ss_output_name"] == "e2e" and set(f.keys()) == set(g.keys())
    assert sorted(p.name for p in comfy_dir.iterdir()) == ["e2e.json", "e2e.preview.png", "e2e.safetensors"]

    # the job's folder: config snapshot (absolute paths) and log
    job_dir = Path(final["job_dir"])
    snapshot = yaml.safe_load((job_dir / "config.yaml").read_text())
    assert snapshot["deploy_dir"] == str(lora_dir) and snapshot["max_train_steps"] == 8
    assert "Training started... total steps: 8" in log["text"]

    # the server process never loaded torch, though it ran a training job
    maps = Path(f"/proc/{daemon.proc.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()


def test_stop_saves_cancel_discards_and_priority_orders_the_queue(daemon, sd_config, tmp_path):
    lora_dir = tmp_path / "Lora"
    long = dict(max_train_steps=500, save_steps=0, deploy_dir=lora_dir)
    with daemon.client() as client:
        first = submit_yaml(client, sd_config(output_name="first", **long))
        collect(client, first["id"], until=lambda e: e["kind"] == "progress" and e["data"]["step"] >= 2)
        low = submit_yaml(client, sd_config(output_name="low", max_train_steps=2), priority=0)
        high = submit_yaml(client, sd_config(output_name="high", **long), priority=5)
        assert client.info()["queue"] == {"running": [first["id"]], "queued": [high["id"], low["id"]]}

        # stop: the trainer saves what it has and finishes; the result says so
        client.stop(first["id"])
        events = collect(client, first["id"])
        assert [e["kind"] for e in events].count("stopping") == 1
        done = events[-1]
        assert done["kind"] == "finished" and done["data"]["stopped_early"] is True
        assert 2 <= done["data"]["steps"] < 500
        assert (lora_dir / "first.safetensors").is_file()

        # the higher priority job runs before the one queued earlier
        collect(client, high["id"], until=lambda e: e["kind"] == "progress")
        assert client.get(low["id"])["state"] == "queued"
        cancelled = client.cancel(low["id"])  # queued: simply never runs
        assert cancelled["state"] == "cancelled"

        # cancel a running job: its process is killed, nothing is deployed
        pid = client.get(high["id"])["pid"]
        assert pid and pid_alive(pid)
        client.cancel(high["id"])
        events = collect(client, high["id"])
        assert events[-1]["kind"] == "cancelled"
        wait_until(lambda: not pid_alive(pid), 10, "the cancelled worker to exit")
        assert client.get(high["id"])["state"] == "cancelled"
        assert sorted(p.name for p in lora_dir.iterdir()) == ["first.json", "first.preview.png", "first.safetensors"]
        assert client.info()["queue"] == {"running": [], "queued": []}
        states = {j["name"]: j["state"] for j in client.jobs()}
        assert states == {"first": "finished", "low": "cancelled", "high": "cancelled"}

        # delete forgets a job and its folder; outputs elsewhere stay
        job_dir = Path(client.get(first["id"])["job_dir"])
        assert (job_dir / "job.log").is_file()
        client.delete(first["id"])
        assert not job_dir.exists() and (lora_dir / "first.safetensors").is_file()
        assert {j["id"] for j in client.jobs()} == {low["id"], high["id"]}


def test_a_job_failing_in_its_worker_reports_the_cli_error_and_the_daemon_goes_on(daemon, sd_config, tmp_path):
    """Submit checks what can be checked without torch (a .safetensors file's header, say); a .ckpt is a
    pickle, read only by the worker: a bad one fails there, with the one line the CLI would print; the
    daemon carries on."""
    bogus = tmp_path / "model.ckpt"
    bogus.write_text("hello")
    with daemon.client() as client:
        job = submit_yaml(client, sd_config(base_model=bogus, output_name="broken"))
        events = collect(client, job["id"])
        assert [e["kind"] for e in events] == ["queued", "memory_plan", "failed"]
        failure = events[-1]["data"]
        assert failure["cause"] == "user" and "model.ckpt: not a readable checkpoint" in failure["error"]
        final = client.get(job["id"])
        assert final["state"] == "failed" and final["error"] == failure["error"] and final["result"] is None
        assert "error: " + failure["error"] in client.logs(job["id"])["text"]
        assert client.info()["queue"] == {"running": [], "queued": []}


def test_cancel_removes_what_the_job_saved_and_nothing_else(daemon, sd_config, tmp_path):
    """Cancel keeps nothing (docs/protocol.md): the step checkpoints and training states this job
    wrote go; the user's files and another job's checkpoints in the same output folder stay."""
    out = tmp_path / "out" / "shared"
    theirs = [out / "notes.txt", out / "checkpoints" / "other-step000002.safetensors",
              out / "checkpoints" / "other-state-step000002" / "trainer.json"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not this job's")
    config = sd_config(output_dir=out, output_name="dropped", max_train_steps=500, save_steps=2, save_last_n=0)
    with daemon.client() as client:
        job = submit_yaml(client, config)
        seen = collect(client, job["id"], until=lambda e: e["kind"] == "checkpoint" and e["data"]["step"] >= 4)
        saved = [Path(p) for e in seen if e["kind"] == "checkpoint" for p in (e["data"]["path"], e["data"]["state"])]
        assert len(saved) == 4 and all(p.exists() for p in saved)
        client.cancel(job["id"])
        end = collect(client, job["id"])[-1]
        job_dir = Path(client.get(job["id"])["job_dir"])
    assert end["kind"] == "cancelled"
    assert not any(p.exists() for p in saved), [p for p in saved if p.exists()]
    assert set(map(Path, end["data"]["removed"])) >= set(saved)
    assert all(p.read_text() == "not this job's" for p in theirs)  # never touched
    assert not list(out.glob("dropped*")) and not list((out / "checkpoints").glob("*dropped*"))
    assert (job_dir / "job.log").is_file()  # the job's log stays until `delete`
