"""Load: 50 clients subscribed at once to 100 queued jobs.

The jobs are dry runs (`submit` with `dry_run: true`): each goes through the queue and a worker
process like training does (validated again there, events `started`, `progress`, `finished`) but
loads no model, so a hundred of them fit in CI. The jobs must start in the order they were queued,
and every client must get every event of every job once and in sequence order, the same events the
daemon stored.

RELIABILITY_LOAD_CLIENTS (default 50) and RELIABILITY_LOAD_JOBS (default 100) scale it up.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import count
from daemon_harness import DaemonProcess
from websockets.asyncio.client import connect

from shared.client import TERMINAL_EVENTS, TOKEN_HEADER


async def open_client(daemon: DaemonProcess):
    ws = await connect(f"ws://127.0.0.1:{daemon.port}", additional_headers={TOKEN_HEADER: daemon.token},
                       max_size=None, max_queue=None)
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


async def request(ws, **msg) -> dict:
    await ws.send(json.dumps({"v": 1, **msg}))
    while True:
        reply = json.loads(await ws.recv())
        if reply.get("id") == msg.get("id"):
            return reply


async def follow_all(ws, job_ids: list[str]) -> dict[str, list[dict]]:
    """Subscribe to every job, then read until each has ended; events per job in arrival order."""
    for job_id in job_ids:
        await ws.send(json.dumps({"v": 1, "type": "subscribe", "job": job_id}))
    seen: dict[str, list[dict]] = {job_id: [] for job_id in job_ids}
    open_jobs = set(job_ids)
    while open_jobs:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if msg.get("type") == "event":
            seen[msg["job"]].append(msg)
            if msg["kind"] in TERMINAL_EVENTS:
                open_jobs.discard(msg["job"])
        elif msg.get("type") == "error":
            raise AssertionError(msg)
    return seen


@pytest.mark.slow
def test_fifty_clients_follow_a_hundred_queued_jobs(tmp_path, tmp_path_factory, tiny_sd, record):
    from shared.fixtures.images import make_image_folder

    clients, jobs = count("LOAD_CLIENTS", 50), count("LOAD_JOBS", 100)
    images = make_image_folder(tmp_path / "images", count=3)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "config.yaml").write_text("max_parallel_jobs: 2\n")
    config = {"base_model": str(tiny_sd["safetensors"]), "model_config": str(tiny_sd["config"]),
              "train_data_dir": str(images), "output_dir": str(tmp_path / "out"), "resolution": 64}
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()

    async def scenario():
        submitter = await open_client(daemon)
        followers = await asyncio.gather(*(open_client(daemon) for _ in range(clients)))
        ids = []
        for n in range(jobs):
            reply = await request(submitter, type="submit", id=f"s{n}", dry_run=True,
                                  config={**config, "output_name": f"dry{n:03d}"})
            assert reply["type"] == "submitted", reply
            ids.append(reply["job"]["id"])
        seen = await asyncio.gather(*(follow_all(ws, ids) for ws in followers))
        listed = (await request(submitter, type="list", id="l", limit=jobs))["jobs"]
        stored = await follow_all(submitter, ids)  # the whole stored history, replayed
        for ws in [submitter, *followers]:
            await ws.close()
        return ids, seen, listed, stored

    start = time.monotonic()
    try:
        ids, seen, listed, stored = asyncio.run(scenario())
    finally:
        daemon.stop()
    wall = time.monotonic() - start

    by_id = {j["id"]: j for j in listed}
    start_order = sorted(ids, key=lambda i: by_id[i]["started_at"])
    expected = {job_id: [(e["seq"], e["kind"]) for e in events] for job_id, events in stored.items()}
    delivered = sum(len(events) for client in seen for events in client.values())
    wrong = sum(1 for client in seen for job_id, events in client.items()
                if [(e["seq"], e["kind"]) for e in events] != expected[job_id])
    record("load", clients=clients, jobs=jobs, finished=sum(j["state"] == "finished" for j in listed),
           events_delivered=delivered, clients_with_missing_or_misordered_events=wrong,
           queue_order_kept=start_order == ids, wall_s=round(wall, 1))

    assert all(by_id[i]["state"] == "finished" and by_id[i]["result"]["dry_run"] for i in ids)
    assert start_order == ids
    for job_id, events in expected.items():
        assert [s for s, _ in events] == list(range(1, by_id[job_id]["last_seq"] + 1))
        assert [k for _, k in events] == ["queued", "started", "progress", "finished"]
    assert wrong == 0
    assert delivered == clients * sum(len(e) for e in expected.values())
