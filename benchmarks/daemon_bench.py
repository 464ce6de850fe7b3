"""The daemon's costs: start time and idle memory (benchmarks/daemon_idle.py), submit-to-first-progress
latency, event fan-out latency with 50 subscribers, and the total overhead of a job run through the
daemon against the same config trained in-process, on the tiny SD1.5 model.

    python -m benchmarks.daemon_bench [--steps N] [--subscribers 50]

Clocks: every time here is `time.time()` on this one machine; an event's `time` is when the daemon
stored and sent it, so (received - event time) is the fan-out latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, RESULT_PREFIX, emit, worker_env
from benchmarks.daemon_idle import free_port, one_run
from shared.client import DaemonClient, DaemonUnavailable


def make_job(root: Path, steps: int) -> dict:
    """The tiny SD1.5 model, 8 images, and a config for `steps` steps (as a dict with absolute paths)."""
    import torch

    from shared.fixtures.images import make_image_folder
    from shared.fixtures.tiny_sd import build_tiny_sd

    paths = build_tiny_sd(root / "model", "sd1", dtype=torch.float16)
    images = make_image_folder(root / "images", count=8)
    return dict(base_model=str(paths["safetensors"]), model_config=str(paths["config"]), train_data_dir=str(images),
                resolution=64, batch_size=2, max_train_steps=steps, save_steps=0, lora_rank=8)


def in_process_run(config: dict, out: Path) -> dict:
    """`run_training` in a fresh process (imports included, as a daemon worker pays them too): wall
    time from launch to exit, and from launch to the first finished step."""
    spec = out.parent / f"{out.name}.json"
    spec.write_text(json.dumps({**config, "output_dir": str(out)}))
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.daemon_bench", "--worker", str(spec)],
                          capture_output=True, text=True, env=worker_env(1), cwd=REPO)
    total = time.time() - launched
    line = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode or not line:
        raise RuntimeError(f"in-process training failed:\n{proc.stderr[-2000:]}")
    result = json.loads(line[-1][len(RESULT_PREFIX):])
    return {"total_s": total, "first_progress_s": result["first_progress"] - launched,
            "steps_s": result["last_progress"] - result["first_progress"]}


def worker(spec_file: str) -> None:
    from shared.config import config_from_dict
    from shared.reporting import Reporter
    from shared.train import run_training

    stamps = []

    class Recorder(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "progress":
                stamps.append(time.time())

    run_training(config_from_dict(json.loads(Path(spec_file).read_text())), Recorder())
    emit({"first_progress": stamps[0], "last_progress": stamps[-1]})


class Daemon:
    def __init__(self, root: Path, max_connections: int = 64):
        self.state = root / "state"
        # the default cap is 32 connections: 50 subscribers need the documented setting raised
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "config.yaml").write_text(f"max_connections: {max_connections}\n")
        self.port = free_port()
        args = [sys.executable, "-m", "daemon", "serve", "--state-dir", str(self.state), "--port", str(self.port),
                "--allow-read", str(root), "--allow-write", str(root)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=worker_env(1),
                                     cwd=REPO)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().close()
                break
            except DaemonUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start") from None
                time.sleep(0.05)

    def client(self) -> DaemonClient:
        return DaemonClient.connect(self.state, port=self.port, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def through_daemon(daemon: Daemon, config: dict, out: Path, subscribers: int = 0) -> dict:
    """Submit, follow with one client (plus `subscribers` more), time the first progress and the end."""
    received: list[list[tuple[float, dict]]] = [[] for _ in range(subscribers)]
    with daemon.client() as client:
        submitted = time.time()
        job = client.submit({**config, "output_dir": str(out)}, base_dir=out.parent)
        threads, errors = [], []
        ready = threading.Barrier(subscribers + 1) if subscribers else None

        def listen(i: int) -> None:
            try:
                with daemon.client() as c:
                    c.subscribe(job["id"])
                    ready.wait(120)
                    for event in c.events(timeout=300):
                        received[i].append((time.time(), event))
                        if event["kind"] in ("finished", "failed", "cancelled"):
                            return
            except Exception as exc:  # noqa: BLE001 - counted below as an incomplete subscriber
                errors.append(f"{type(exc).__name__}: {exc}")
                ready.abort()

        for i in range(subscribers):
            threads.append(threading.Thread(target=listen, args=(i,), daemon=True))
            threads[-1].start()
        if ready:
            try:
                ready.wait(120)
            except threading.BrokenBarrierError:
                pass
        first = None
        end = None
        for event in client.follow(job["id"]):
            now = time.time()
            if event["kind"] == "progress" and first is None:
                first = (now, event)
            if event["kind"] in ("finished", "failed", "cancelled"):
                end = (now, event)
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
    if end is None or end[1]["kind"] != "finished":
        raise RuntimeError(f"the daemon job did not finish: {end and end[1]}")
    out_ = {"total_s": end[0] - submitted, "first_progress_s": first[0] - submitted,
            "first_progress_emit_to_client_s": first[0] - first[1]["time"]}
    if subscribers:
        lat = sorted(now - ev["time"] for rec in received for now, ev in rec if ev["kind"] == "progress")
        complete = sum(1 for rec in received if rec and rec[-1][1]["kind"] == "finished")
        out_.update({"subscribers": subscribers, "subscribers_complete": complete,
                     "subscriber_errors": errors[:3], "events_received": len(lat),
                     "event_latency_median_s": statistics.median(lat) if lat else None,
                     "event_latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
                     "event_latency_max_s": lat[-1] if lat else None})
    return out_


def run(workdir: Path, steps: int = 20, subscribers: int = 50, runs: int = 2, log=print) -> dict:
    import tempfile

    workdir.mkdir(parents=True, exist_ok=True)
    idle = [one_run(2.0) for _ in range(runs + 1)]
    start = {"start_s_median": statistics.median(r[0] for r in idle), "start_s_runs": [r[0] for r in idle],
             "idle_rss_mb_median": statistics.median(r[1] for r in idle if r[1] is not None),
             "torch_loaded": any(r[2] for r in idle)}
    log(f"Daemon: start {start['start_s_median']:.2f} s, idle RSS {start['idle_rss_mb_median']:.1f} MiB")
    root = Path(tempfile.mkdtemp(dir=workdir))
    config = make_job(root, steps)
    daemon = Daemon(root)
    try:
        direct, via = [], []
        for r in range(runs):  # alternate: in-process, daemon, in-process, daemon
            direct.append(in_process_run(config, root / f"direct-{r}"))
            via.append(through_daemon(daemon, config, root / f"daemon-{r}"))
            log(f"Daemon: job {r + 1}: in-process {direct[-1]['total_s']:.2f} s, through the daemon "
                f"{via[-1]['total_s']:.2f} s (first progress {direct[-1]['first_progress_s']:.2f} s vs "
                f"{via[-1]['first_progress_s']:.2f} s)")
        fan = through_daemon(daemon, config, root / "fanout", subscribers=subscribers)
        log(f"Daemon: {subscribers} subscribers: median event latency {fan['event_latency_median_s'] * 1000:.1f} ms")
    finally:
        daemon.stop()
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        **start, "job_steps": steps,
        "in_process_total_s": med(direct, "total_s"), "daemon_total_s": med(via, "total_s"),
        "overhead_s": med(via, "total_s") - med(direct, "total_s"),
        "in_process_first_progress_s": med(direct, "first_progress_s"),
        "submit_to_first_progress_s": med(via, "first_progress_s"),
        "first_progress_delay_s": med(via, "first_progress_s") - med(direct, "first_progress_s"),
        "first_progress_emit_to_client_s": med(via, "first_progress_emit_to_client_s"),
        "fanout": fan, "runs": {"in_process": direct, "daemon": via}, "load_avg_end": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    print(json.dumps(run(Path(args.workdir) / "daemon", args.steps, args.subscribers), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
