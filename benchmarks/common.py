"""What every benchmark shares: running one variant in its own process, reading its peak memory,
the machine's matmul throughput, and a description of the machine.

A variant runs as `python -m benchmarks.<module> --worker NAME --spec FILE` and prints one line
`RESULT {json}` last; its peak RSS is the child's own VmHWM (so the parent's memory never mixes in).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_worker(module: str, name: str, spec: dict, workdir: Path, timeout: float = 3600) -> dict:
    """Run one variant in a fresh interpreter; return its RESULT dict (with wall time and load average)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec, default=str))
    log = workdir / f"{name}.log"
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--worker", name, "--spec", str(spec_file)],
                              stdout=subprocess.PIPE, stderr=out, text=True, env=worker_env(spec["threads"]),
                              cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"benchmark worker {module}:{name} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_wall_s"] = time.perf_counter() - started
    result["load_avg"] = [load_before, os.getloadavg()[0]]
    return result


def emit(result: dict) -> None:
    """A worker's last line: its result plus its peak memory (unless the worker measured a child's)."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(RESULT_PREFIX + json.dumps(result, default=float), flush=True)


def matmul_flops(threads: int, size: int = 1024, seconds: float = 1.5, dtype=None, device: str = "cpu") -> float:
    """Measured fp32 (or `dtype`) matmul throughput, FLOP/s: the machine's practical peak for MFU."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t))
    return best


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (forward and backward inside it), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Durations of the steps after the first `warmup` ones, from the times each step ended."""
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    return durations[max(0, warmup - 1):]


def compare_main(argv, *, doc: str, sizes, default_steps: int, section: str, run, worker_main,
                 options: dict | None = None, table=None) -> int:
    """The command line both comparisons share: `--worker NAME --spec FILE` runs one variant in this
    process (what run_worker starts); without it, the whole comparison runs. `options`: a comparison's
    own flags ({flag: argparse keywords}), passed to `run` as keywords. With `table` (result -> text)
    the table is printed and the JSON written beside the runs; without it the JSON is printed."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--size", choices=sizes, default="full")
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the comparison's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench")
    extra = [parser.add_argument(flag, **kwargs).dest for flag, kwargs in (options or {}).items()]
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(Path(args.spec).read_text()))
        return 0
    kwargs = {name: getattr(args, name) for name in extra}
    if args.warmup is not None:
        kwargs["warmup"] = args.warmup
    result = run(Path(args.workdir) / section, args.size, args.steps, rounds=args.rounds, threads=args.threads,
                 model_cache=Path(args.workdir), **kwargs)
    text = json.dumps(result, indent=2, default=float)
    if table is None:
        print(text)
        return 0
    out = Path(args.workdir) / section / "result.json"
    out.write_text(text)
    print(table(result))
    print(f"Every number: {out}")
    return 0
