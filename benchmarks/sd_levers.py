"""Each SD speed lever on its own: our trainer with its defaults, then with one lever turned back (or
an extra one tried), each variant in its own process, the same images and steps for all. It says
which lever pays on this machine, and by how much (issue 18: "measure each lever and keep what pays").

    python -m benchmarks.sd_levers [--size full|tiny] [--steps N] [--warmup W] [--only a,b]

Variants: `defaults` (mixed_precision auto, both caches, fused AdamW, channels_last auto), `fp32`
(mixed_precision: no), `no_caches` (cache_latents: no, cache_text_encoder_outputs: no), `foreach_adamw`
(torch's multi-tensor AdamW instead of the fused one), `contiguous` (channels_last: no), `compile`
(compile: true; the warm-up step is reported apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import emit, median, run_worker, step_times
from benchmarks.sd_compare import SIZES, build_model, make_data

VARIANTS = {
    "defaults": {},
    "fp32": {"mixed_precision": "no"},
    "no_caches": {"cache_latents": "no", "cache_text_encoder_outputs": "no"},
    "foreach_adamw": {},
    "contiguous": {"channels_last": "no"},
    "compile": {"compile": True},
}


def worker(name: str, spec: dict) -> dict:
    import torch

    from benchmarks.memory_estimate import memory_fields
    from shared.config import config_from_dict
    from shared.reporting import Reporter
    from shared.train import run_training

    torch.set_num_threads(spec["threads"])
    stamps, warmup = [], {}

    class Recorder(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "progress":
                stamps.append(time.perf_counter())
            if kind == "compiled":
                warmup["s"] = data["warmup_s"]

    if name == "foreach_adamw":  # the lever turned back: torch's multi-tensor AdamW
        original = torch.optim.AdamW

        class ForeachAdamW(original):
            def __init__(self, params, **kwargs):
                kwargs.pop("fused", None)
                super().__init__(params, foreach=True, **kwargs)

        torch.optim.AdamW = ForeachAdamW  # shared/training/optim.py looks it up at each build
    cfg = config_from_dict(dict(
        base_model=spec["model"], train_data_dir=spec["data"], output_dir=spec["out"], resolution=spec["resolution"],
        batch_size=1, max_train_steps=spec["steps"], save_steps=0, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
        learning_rate=2e-4, seed=42, device="cpu", preview=False, evaluation=False, **VARIANTS[name]))
    t0 = time.perf_counter()
    result = run_training(cfg, Recorder())
    return {"step_s": step_times(stamps, spec["warmup"]), "warmup_s": warmup.get("s"),
            "total_s": time.perf_counter() - t0, **memory_fields(result)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="comma-separated variants (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-daemon-bench/sd_levers"))
    parser.add_argument("--worker")
    parser.add_argument("--spec", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec.read_text())
        if args.worker == "build":
            build_model(Path(spec["model"]), spec["configs"])
            emit({})
        else:
            emit(worker(args.worker, spec))
        return 0
    info = SIZES[args.size]
    model = args.workdir.parent / f"sd15-{args.size}-random"
    run_worker("sd_levers", "build", {"threads": args.threads, "model": str(model), "configs": info["configs"]},
               args.workdir)
    data = make_data(args.workdir / "sd-data", info["resolution"])
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = {}
    for name in names:
        spec = dict(model=str(model), data=str(data), resolution=info["resolution"], steps=args.warmup + args.steps,
                    warmup=args.warmup, threads=args.threads, out=str(args.workdir / f"out-{name}"))
        result = run_worker("sd_levers", name, spec, args.workdir)
        rows[name] = {"median_step_s": median(result["step_s"]), "peak_rss_mb": result["peak_rss_mb"],
                      "warmup_s": result.get("warmup_s"), "estimate_mb": result.get("estimate_mb"),
                      "load_avg": result["load_avg"]}
        print(f"{name}: {rows[name]['median_step_s']:.3f} s/step, peak RSS {result['peak_rss_mb']:.0f} MiB"
              + (f", compile warm-up {result['warmup_s']:.0f} s" if result.get("warmup_s") else ""), flush=True)
    base = rows.get("defaults")
    print(f"\nSD {args.size} ({info['resolution']} px, batch 1, {args.threads} thread): s/step vs defaults")
    for name, row in rows.items():
        ratio = f"{row['median_step_s'] / base['median_step_s']:.2f}x" if base else "-"
        print(f"  {name:14s} {row['median_step_s']:8.3f} s/step  {ratio:>6s}  peak RSS {row['peak_rss_mb']:6.0f} MiB")
    (args.workdir / "sd_levers.json").write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
