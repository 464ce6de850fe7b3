"""How quickly the daemon starts and how much memory it holds while idle (it must not load torch).

    python benchmarks/daemon_idle.py [--runs 3]

Starts `python -m daemon serve` on a free loopback port with a temporary state folder, times the
launch until the first `info` request is answered, then reads the idle process's resident memory and
checks that no torch library is mapped into it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.client import DaemonClient, DaemonUnavailable  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


def torch_mapped(pid: int) -> bool | None:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def one_run(idle_s: float) -> tuple[float, float | None, bool | None]:
    with tempfile.TemporaryDirectory() as tmp:
        state, port = Path(tmp) / "state", free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--state-dir", str(state), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        try:
            while True:
                try:
                    with DaemonClient.connect(state, port=port, timeout=5) as client:
                        client.info()
                    break
                except DaemonUnavailable:
                    if proc.poll() is not None or time.perf_counter() - started > 60:
                        raise SystemExit("the daemon did not start") from None
                    time.sleep(0.02)
            ready = time.perf_counter() - started
            time.sleep(idle_s)
            return ready, rss_mb(proc.pid), torch_mapped(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before measuring memory")
    args = parser.parse_args()
    results = [one_run(args.idle) for _ in range(args.runs)]
    starts = [r[0] for r in results]
    rss = [r[1] for r in results if r[1] is not None]
    print(f"daemon start to first answered request: median {statistics.median(starts):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in starts)})")
    print(f"idle resident memory: {statistics.median(rss):.1f} MiB" if rss else "idle resident memory: n/a")
    mapped = {r[2] for r in results}
    print(f"torch loaded in the daemon process: {'yes' if True in mapped else 'no' if False in mapped else 'n/a'}")
    return 1 if True in mapped else 0


if __name__ == "__main__":
    sys.exit(main())
