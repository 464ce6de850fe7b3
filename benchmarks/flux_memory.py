"""Flux on the CPU: step time and peak RSS of a LoRA training step with the base stored in bf16 vs
float8_e4m3fn (computed in bf16 either way), with and without block swap. Prints numbers; asserts
nothing (memory and speed are not tests). Each variant runs in its own process, so its peak RSS
(VmHWM) is its own: load the BFL file, encode one caption and free the text encoders (as with the
text cache), then forward + backward + AdamW steps on a fixed batch of random latents.

    .venv/bin/python -m benchmarks.flux_memory [--steps N] [--sizes tiny small]

Sizes: `tiny` is the test fixture (0.4M transformer weights: RSS is interpreter and torch);
`small` is the same architecture at 512 wide with 4 double and 8 single blocks (69M weights), where
the storage dtype shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, emit, median, run_worker

SIZES = {"tiny": None, "small": "SMALL_TRANSFORMER"}
VARIANTS = {"bf16": {"fp8_base": False, "swap": 0}, "fp8": {"fp8_base": True, "swap": 0},
            "bf16+swap": {"fp8_base": False, "swap": 4}}


def build(folder: Path, size: str) -> dict:
    from shared.fixtures import tiny_flux

    if (folder / ".complete").is_file():
        return json.loads((folder / ".complete").read_text())
    overrides = getattr(tiny_flux, SIZES[size]) if SIZES[size] else None
    paths = tiny_flux.build_tiny_flux(folder, "dev", transformer=overrides, all_layouts=False)
    paths = {k: str(v) for k, v in paths.items()}
    (folder / ".complete").write_text(json.dumps(paths))
    return paths


def worker_step(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from shared.flux import conditioning as C
    from shared.flux import flow_matching as FM
    from shared.flux.base_model import load_flux_model
    from shared.flux.block_swap import BlockSwap
    from shared.flux.lora import inject_flux_lora, select_targets
    from shared.flux.text_cache import free_text_encoders

    p = spec["paths"]
    t0 = time.perf_counter()
    model = load_flux_model(p["transformer"], ae=p["ae"], clip_l=p["clip_l"], t5xxl=p["t5xxl"],
                            t5_tokenizer=p["t5_tokenizer"], model_config=p["model_config"], dtype=torch.bfloat16,
                            fp8_base=spec["fp8_base"])
    load_s = time.perf_counter() - t0
    from benchmarks.common import peak_rss_mb

    load_peak = peak_rss_mb()
    with torch.no_grad():
        text = C.encode_text(model, ["a photo of sks dog"], max_sequence_length=64)
    free_text_encoders(model)
    transformer = model.transformer
    params = inject_flux_lora(transformer, select_targets(transformer.config), rank=16, alpha=16.0)
    transformer.train()
    if spec["swap"]:
        # the CPU has no second device: the swap moves weights to float32 "offload" copies and back,
        # which runs the mechanism (and costs what a real move would in conversions)
        BlockSwap(transformer, spec["swap"], device="cpu", offload_dtype=torch.float32).install()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(1, 16, spec["latent"], spec["latent"], generator=torch.Generator().manual_seed(0))
    step_s, losses = [], []
    for step in range(spec["steps"]):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = FM.flow_matching_loss(transformer, latents, text, [torch.Generator().manual_seed(step)],
                                         timestep_sampling="shift")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - started)
        losses.append(loss.item())
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    weights = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if not p.requires_grad)
    return {"load_s": load_s, "step_s": step_s, "losses": losses, "block_weight_mb": weights / 2**20,
            "load_peak_rss_mb": load_peak}


def run(workdir: Path, sizes: list[str], steps: int, threads: int = 1) -> dict:
    out = {}
    for size in sizes:
        paths = build(workdir / f"flux-{size}", size)
        rows = {}
        for label, variant in VARIANTS.items():
            spec = dict(paths=paths, steps=steps, threads=threads, latent=16 if size == "small" else 8, **variant)
            r = run_worker("flux_memory", "step", spec, workdir)
            rows[label] = {"median_step_s": median(r["step_s"][1:] or r["step_s"]), "peak_rss_mb": r["peak_rss_mb"],
                           "block_weight_mb": r["block_weight_mb"], "load_s": r["load_s"], "losses": r["losses"],
                           "load_peak_rss_mb": r["load_peak_rss_mb"]}
        out[size] = rows
    return out


def markdown(result: dict) -> str:
    lines = ["| size | variant | s/step | peak RSS MiB | peak RSS after load MiB | frozen block weights MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for size, rows in result.items():
        for label, r in rows.items():
            lines.append(f"| {size} | {label} | {r['median_step_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['load_peak_rss_mb']:.0f} | {r['block_weight_mb']:.1f} |")
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
