"""Flux on the CPU through the Flux task: step time and peak RSS of a LoRA run with the base stored as the
run stores it vs in float8_e4m3fn (fp8_base), and with block swap on top. Prints numbers; asserts nothing
(memory and speed are not tests). Each variant runs in its own process, so its peak RSS (VmHWM) is its
own: `train` on one image with the text and latent caches (the encoders are freed, as on a card), bf16
autocast, rank 16, batch 1.

    .venv/bin/python -m benchmarks.flux_memory [--steps N] [--sizes tiny small]   # also a run_all section

Sizes: `tiny` is the test fixture (0.4M transformer weights: RSS is interpreter and torch);
`small` is the same architecture at 512 wide with 4 double and 8 single blocks (69M weights), where
the storage dtype shows. On this CPU the base is stored in fp32 (shared/training/precision.py), so fp8
stores the block weights in a quarter of the bytes; on a GPU the base is bf16 and fp8 halves it. Block
swap on a CPU-only machine moves nothing (there is no second memory): it measures the recompute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, emit, median, run_worker, step_times

SIZES = {"tiny": None, "small": "SMALL_TRANSFORMER"}
RESOLUTION = {"tiny": 64, "small": 128}
VARIANTS = {"base": {"fp8_base": "false", "blocks_to_swap": "0"},
            "fp8 base": {"fp8_base": "true", "blocks_to_swap": "0"},
            "fp8 base + swap 4": {"fp8_base": "true", "blocks_to_swap": "4"}}


def build(folder: Path, size: str) -> dict:
    """The size's model files (the BFL transformer, ae, CLIP-L, T5 and a config folder) and one image."""
    from shared.fixtures import tiny_flux
    from shared.fixtures.images import make_image_folder

    if (folder / ".complete").is_file():
        return json.loads((folder / ".complete").read_text())
    overrides = getattr(tiny_flux, SIZES[size]) if SIZES[size] else None
    paths = tiny_flux.build_tiny_flux(folder, "dev", transformer=overrides, all_layouts=False)
    paths["images"] = make_image_folder(folder / "images", count=1, size=(RESOLUTION[size],) * 2)
    paths = {k: str(v) for k, v in paths.items()}
    (folder / ".complete").write_text(json.dumps(paths))
    return paths


def train_through_task(values: dict, warmup: int, on_started=None) -> dict:
    """Run `train` on a config dict (no pre-flight: the benchmark's files are known) and time its steps;
    `on_started` runs when training starts (after loading and caching). Also returns the frozen weight
    bytes of the transformer's blocks as the task holds them."""
    from shared.config import config_from_dict
    from shared.flux.task import FluxTask
    from shared.reporting import Reporter
    from shared.train import run_training

    stamps, losses, lines, held = [], [], [], {}

    class Recorder(Reporter):
        def log(self, message):
            lines.append(message)

        def event(self, kind, **data):
            if kind == "started" and on_started is not None:
                on_started()
            if kind == "progress":
                stamps.append(time.perf_counter())
                losses.append(data["loss"])

    original = FluxTask.build_caches

    def build_caches(self):
        blocks = [*self.model.transformer.transformer_blocks, *self.model.transformer.single_transformer_blocks]
        swapped = {id(b) for b in (self.swap.blocks if self.swap else [])}

        def mb(chosen) -> float:
            return sum(p.numel() * p.element_size() for b in chosen for p in b.parameters() if not p.requires_grad) / 2**20

        held["block_weight_mb"] = mb(blocks)
        held["block_weight_on_device_mb"] = mb([b for b in blocks if id(b) not in swapped])
        return original(self)

    FluxTask.build_caches = build_caches
    started = time.perf_counter()
    run_training(config_from_dict(values), Recorder())
    return {"step_s": step_times(stamps, warmup), "losses": losses, "total_s": time.perf_counter() - started,
            "log": lines[-30:], **held}


def job_values(paths: dict, size: str, steps: int, out: Path, **variant) -> dict:
    return dict(base_model=paths["transformer"], flux_ae=paths["ae"], flux_clip_l=paths["clip_l"],
                flux_t5xxl=paths["t5xxl"], model_config=paths["model_config"], t5_tokenizer=paths["t5_tokenizer"],
                train_data_dir=paths["images"], output_dir=str(out), resolution=RESOLUTION[size], batch_size=1,
                max_train_steps=steps, save_steps=0, lora_rank=16, lora_alpha=16.0, lora_dropout=0.0,
                learning_rate=1e-4, seed=0, device="cpu", mixed_precision="bf16", cache_latents="memory",
                flux_text_cache="memory", t5_max_length=64, preview=False, **variant)


def worker_step(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    values = job_values(spec["paths"], spec["size"], spec["steps"], Path(spec["out"]), **spec["variant"])
    return train_through_task(values, spec["warmup"])


def run(workdir: Path, sizes: list[str], steps: int, threads: int = 1, warmup: int = 1,
        variants: list[str] | None = None) -> dict:
    out = {}
    for size in sizes:
        paths = build(workdir / f"flux-{size}", size)
        rows = {}
        for label in variants or VARIANTS:
            variant = VARIANTS[label]
            spec = dict(paths=paths, size=size, steps=steps, warmup=warmup, threads=threads, variant=variant,
                        out=str(workdir / f"out-{size}-{label.replace(' ', '_').replace('+', '')}"))
            r = run_worker("flux_memory", "step", spec, workdir)
            rows[label] = {"median_step_s": median(r["step_s"]), "peak_rss_mb": r["peak_rss_mb"],
                           "block_weight_mb": r["block_weight_mb"], "losses": r["losses"], "total_s": r["total_s"]}
        out[size] = rows
    return out


def markdown(result: dict) -> str:
    lines = ["| size | variant | s/step | peak RSS MiB | frozen block weights MiB |", "|---|---|---:|---:|---:|"]
    for size, rows in result.items():
        for label, r in rows.items():
            step = f"{r['median_step_s']:.3f}" if r["median_step_s"] is not None else "n/a"
            lines.append(f"| {size} | {label} | {step} | {r['peak_rss_mb']:.0f} | {r['block_weight_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench-flux")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        emit(worker_step(spec))
        return 0
    result = run(Path(args.workdir), args.sizes, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
