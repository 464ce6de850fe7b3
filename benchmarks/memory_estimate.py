"""The memory planner's estimate beside the measured peak (docs/memory.md), for the benchmarks' tables.

For a benchmark's own worker (e.g. benchmarks/sd_compare.py's `worker_ours`), which runs `run_training`
in a fresh process: `memory_fields(result)` gives the columns to add to its result, and
`memory_column(row)` the text for its table:

    result = run_training(cfg, Recorder())
    return {..., **memory_fields(result)}

On its own it runs any config as one job in a fresh process (peak RSS counts from a process's start)
and prints the estimate, the peak and their difference:

    python -m benchmarks.memory_estimate --config my.yaml [key=value ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import emit, run_worker

TARGET = 0.15  # the target: the estimate within 15% of the measured peak


def memory_fields(result) -> dict:
    """A TrainResult's (or its `memory` dict's) estimate and measured peak as benchmark result fields:
    `estimate_mb`, `estimate_peak_mb` (what the trainer measured: VmHWM, or torch's reserved VRAM),
    `estimate_vs_peak` (+0.05: the estimate was 5% above the peak), `estimate_device`."""
    memory = getattr(result, "memory", result) or {}
    if not memory.get("estimate_gb"):
        return {}
    peak = memory.get("peak_gb")
    return {"estimate_mb": memory["estimate_gb"] * 1024, "estimate_peak_mb": peak * 1024 if peak else None,
            "estimate_vs_peak": memory.get("estimate_vs_peak"), "estimate_device": memory.get("device")}


def memory_column(row: dict) -> str:
    """"1234 MiB (+5%)" for a table's "planner's estimate" column; "-" where the variant has none
    (a reference loop); a miss of the 15% target is marked with "!"."""
    if not row.get("estimate_mb"):
        return "-"
    diff = row.get("estimate_vs_peak")
    if diff is None:
        return f"{row['estimate_mb']:.0f} MiB"
    return f"{row['estimate_mb']:.0f} MiB ({diff:+.0%}{' !' if abs(diff) > TARGET else ''})"


def worker_job(spec: dict) -> dict:
    """In the fresh process: train the config, return the estimate beside the peak."""
    import torch

    from shared.preflight import load_config
    from shared.reporting import Reporter
    from shared.train import run_training

    class Quiet(Reporter):
        def log(self, message):
            print(message, file=sys.stderr, flush=True)

    torch.set_num_threads(spec["threads"])
    result = run_training(load_config(Path(spec["config"]), spec["overrides"] or None), Quiet())
    return {**memory_fields(result), "memory": result.memory}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker")
    parser.add_argument("--spec", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker_job(json.loads(args.spec.read_text())))
        return 0
    if args.config is None:
        parser.error("--config is required")
    spec = {"config": str(args.config.resolve()), "overrides": args.overrides, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="memory-estimate-") as work:
        result = run_worker("memory_estimate", "job", spec, Path(work))
    memory = result["memory"]
    print(f"{args.config} {' '.join(args.overrides)}".strip())
    print(f"  estimate {memory['estimate_gb']:.3f} GB, measured peak {memory['peak_gb']:.3f} GB ({memory['measured']}), "
          f"estimate {memory['estimate_vs_peak']:+.1%} (target: within {TARGET:.0%})")
    print("  " + json.dumps(memory))
    return 0 if abs(memory["estimate_vs_peak"]) <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
