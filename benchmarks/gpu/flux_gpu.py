"""FLUX.1-dev at full size on a CUDA GPU: s/step and peak VRAM of a LoRA step at 1024 px, rank 16,
for the memory levers: bf16 base, fp8 base, and block swap on top of each. Random weights of the
published architecture (19 double + 38 single blocks, 3072 wide), nothing downloaded; prompt
embeddings and latents are random tensors of the real shapes (what the text and latent caches hand
the loop), so the numbers are the transformer's alone. Every variant runs in its own process with
gradient checkpointing (diffusers' own) and AdamW on the LoRA weights.

    python -m benchmarks.gpu.flux_gpu [--out DIR]     # needs CUDA; refuses without it
    python -m benchmarks.gpu.flux_gpu --dry-run       # the same plan on the CPU with the tiny model

Writes `flux-gpu-latest.json` / `.md` (or `flux-gpu-dry-run.*`) beside the other results. Sized for
about 6 minutes on one H100/H200-class card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import REPO, emit, machine, median, run_worker

VARIANTS = {
    "bf16": {"fp8_base": False, "swap": 0},
    "fp8 base": {"fp8_base": True, "swap": 0},
    "fp8 base + swap 20": {"fp8_base": True, "swap": 20},
    "bf16 + swap 20": {"fp8_base": False, "swap": 20},
}


def plan(dry_run: bool) -> dict:
    if dry_run:
        return {"device": "cpu", "size": "tiny", "resolution": 64, "steps": 2, "warmup": 1, "swap_scale": 0.1}
    return {"device": "cuda", "size": "dev", "resolution": 1024, "steps": 5, "warmup": 2, "swap_scale": 1.0}


def _transformer(size: str, device):
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from shared.fixtures.tiny_flux import tiny_configs
    from shared.flux.base_model import shipped_config_dir

    if size == "dev":
        config = json.loads((shipped_config_dir("dev") / "transformer" / "config.json").read_text())
    else:
        config = tiny_configs("dev")["transformer"]
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
    return model.requires_grad_(False)


def worker(spec: dict) -> dict:
    import torch

    from shared.flux import conditioning as C
    from shared.flux import flow_matching as FM
    from shared.flux.block_swap import BlockSwap
    from shared.flux.fp8 import store_in_fp8
    from shared.flux.lora import inject_flux_lora, select_targets

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    transformer = _transformer(spec["size"], device)
    params = inject_flux_lora(transformer, select_targets(transformer.config), rank=16, alpha=16.0)
    if spec["fp8_base"]:
        store_in_fp8(transformer)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    swap = max(0, round(spec["swap"] * spec["swap_scale"]))
    if swap:
        BlockSwap(transformer, swap, device=device, offload_device="cpu",
                  offload_dtype=None if cuda else torch.float64).install()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cfg = transformer.config
    latent = spec["resolution"] // 8
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, latent, latent, generator=g).to(device, torch.bfloat16)
    text = C.FluxText(torch.randn(1, 512, cfg.joint_attention_dim, generator=g),
                      torch.randn(1, cfg.pooled_projection_dim, generator=g), torch.zeros(512, 3)).to(device, torch.bfloat16)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_s, losses = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = FM.flow_matching_loss(transformer, latents, text, [torch.Generator().manual_seed(step)],
                                         timestep_sampling="flux_shift", scheduler=_scheduler())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= spec["warmup"]:
            step_s.append(time.perf_counter() - started)
        losses.append(loss.item())
    out = {"step_s": step_s, "losses": losses, "blocks_swapped": swap}
    if cuda:
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from shared.flux.base_model import shipped_config_dir

    config = json.loads((shipped_config_dir("dev") / "scheduler" / "scheduler_config.json").read_text())
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def run(out: Path, workdir: Path, dry_run: bool) -> dict:
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/flux_gpu needs a CUDA GPU (torch.cuda.is_available() is False here); "
                         "add --dry-run to check this script's plan on the CPU with the tiny model")
    p = plan(dry_run)
    started = time.time()
    result = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": dry_run,
              "machine": machine(), "settings": p, "variants": {}}
    for label, variant in VARIANTS.items():
        spec = {**p, **variant, "threads": 1}
        try:
            r = run_worker("gpu.flux_gpu", "step", spec, workdir, timeout=900)
        except RuntimeError as exc:  # e.g. out of memory on a smaller card: record it, go on
            result["variants"][label] = {"error": str(exc).splitlines()[-1][:300]}
            continue
        result["variants"][label] = {"median_step_s": median(r["step_s"]), "peak_vram_mb": r.get("peak_vram_mb"),
                                     "peak_rss_mb": r["peak_rss_mb"], "blocks_swapped": r["blocks_swapped"],
                                     "losses": r["losses"], "gpu": r.get("gpu")}
    result["wall_s"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    name = "flux-gpu-dry-run" if dry_run else "flux-gpu-latest"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"{name}.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"Flux {'tiny (dry run)' if r['dry_run'] else 'FLUX.1-dev size'} LoRA rank 16 at {s['resolution']} px, "
             f"batch 1, gradient checkpointing, {r['wall_s'] / 60:.1f} min", "",
             "| variant | s/step | peak VRAM MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
    for label, v in r["variants"].items():
        if "error" in v:
            lines.append(f"| {label} | failed: {v['error']} | | |")
            continue
        vram = f"{v['peak_vram_mb']:.0f}" if v.get("peak_vram_mb") else "n/a"
        lines.append(f"| {label} | {v['median_step_s']:.3f} | {vram} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--dry-run", action="store_true", help="the CPU-side plan with the tiny model (no CUDA)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench-flux-gpu")
    args = parser.parse_args(argv)
    if args.worker:
        emit(worker(json.loads(Path(args.spec).read_text())))
        return 0
    print(markdown(run(Path(args.out), Path(args.workdir), args.dry_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
