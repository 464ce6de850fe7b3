"""The same comparisons on a CUDA GPU at real sizes: SD1.5 at 512 px with benchmarks/sd_compare.py's
variants (the textbook loop in fp32 and at its best in bf16 with its caches, ours with its defaults and
in fp32 without caches), an SDXL-layout UNet at 1024 px (ours with its defaults, which cache and pick
bf16 on a bf16 card: the reference loop is SD1.5's),
and a 1B-class LLaMA layout (ours against HF Trainer + PEFT with its defaults and at its best:
benchmarks/gpu/llm_gpu.py). Random weights, nothing downloaded.
Sized to finish in under 8 minutes on one H100-class card (model folders are written first and reused).

    python -m benchmarks.gpu.run_gpu [--out DIR]     # needs CUDA; refuses without it
    python -m benchmarks.gpu.run_gpu --dry-run       # the same plan on the CPU with tiny models

Writes `gpu-latest.json` and `gpu-latest.md` beside the CPU results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import sd_compare
from benchmarks.common import REPO, machine, run_worker
from benchmarks.gpu import llm_gpu
from benchmarks.memory_estimate import memory_column


def plan(dry_run: bool) -> dict:
    if dry_run:
        return {"device": "cpu", "precision": "auto",
                "sd15": dict(size="tiny", steps=2, warmup=1, rounds=1),
                "sdxl": dict(size="tiny", steps=2, warmup=1)}
    return {"device": "cuda", "precision": "auto",  # ours: the defaults; the reference loops set their own
            "sd15": dict(size="gpu", steps=20, warmup=5, rounds=1),
            "sdxl": dict(size="gpu", steps=10, warmup=3)}


def sdxl_ours(workdir: Path, size: str, steps: int, warmup: int, device: str) -> dict:
    """Our trainer with its defaults on an SDXL-layout model (they cache latents and text)."""
    model = workdir / f"sdxl-{size}-random"
    run_worker("gpu.run_gpu", "build_sdxl", {"threads": 1, "model": str(model), "size": size}, workdir)
    resolution = 1024 if size == "gpu" else 64
    data = sd_compare.make_data(workdir / f"sdxl-data-{resolution}", resolution)
    spec = dict(model=str(model), data=str(data), resolution=resolution, batch_size=1, steps=steps + warmup,
                warmup=warmup, rank=8, alpha=16.0, lr=2e-4, seed=42, threads=1, device=device,
                variant="ours", out=str(workdir / "sdxl-out"))
    result = run_worker("gpu.run_gpu", "sdxl_ours", spec, workdir)
    s = sorted(result["step_s"])[len(result["step_s"]) // 2] if result["step_s"] else None
    return {"label": sd_compare.LABELS["ours"], "resolution": resolution, "median_step_s": s,
            "mixed_precision": result.get("mixed_precision"), "caches": result.get("caches"),
            "images_per_s": 1 / s if s else None, "peak_rss_mb": result["peak_rss_mb"],
            "peak_vram_mb": result.get("peak_vram_mb"), "losses": result["losses"],
            **{k: x for k, x in result.items() if k.startswith("estimate_")}}


def build_sdxl(folder: Path, size: str) -> None:
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shared.fixtures.tiny_sd import TINY_SDXL
    from shared.images.clip_tokenizer import clip_tokenizer
    from shared.sd.base_model import shipped_config_dir

    if (folder / ".complete").is_file():
        return
    shipped = Path(shipped_config_dir("sdxl"))
    if size == "gpu":
        configs = {c: json.loads((shipped / c / "config.json").read_text())
                   for c in ("unet", "vae", "text_encoder", "text_encoder_2")}
    else:
        configs = TINY_SDXL
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        cls(CLIPTextConfig(**{k: v for k, v in configs[sub].items() if not k.startswith("_")})).save_pretrained(folder / sub)
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    clip_tokenizer(pad_token="!").save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    (folder / ".complete").write_text("ok")


def run(out: Path, workdir: Path, dry_run: bool) -> dict:
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu needs a CUDA GPU (torch.cuda.is_available() is False here); "
                         "run `python -m benchmarks.run_all` for the CPU benchmarks, or add --dry-run to "
                         "check this script's plan on the CPU with tiny models")
    p = plan(dry_run)
    started = time.time()
    result = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": dry_run,
              "machine": machine(), "device": p["device"], "precision": p["precision"]}
    if torch.cuda.is_available() and not dry_run:
        result["gpu"] = torch.cuda.get_device_name(0)
    result["sd15"] = sd_compare.run(workdir / "sd15", **p["sd15"], device=p["device"], model_cache=workdir)
    result["sdxl"] = sdxl_ours(workdir, p["sdxl"]["size"], p["sdxl"]["steps"], p["sdxl"]["warmup"], p["device"])
    result["llm"] = llm_gpu.run(workdir, dry_run, model_cache=workdir)  # benchmarks/gpu/llm_gpu.py
    result["wall_s"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu-dry-run" if dry_run else "gpu-latest"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"{name}.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"GPU run {r['started_at']} on {r.get('gpu', r['device'])} ({r['precision']}), "
             f"{r['wall_s'] / 60:.1f} min", "",
             "| benchmark | variant | speed | peak VRAM MiB | vs ref | planner's estimate |", "|---|---|---:|---:|---:|---:|"]
    title = f"SD1.5 {r['sd15']['settings']['resolution']} px"
    for row in r["sd15"]["variants"].values():
        best = row.get("time_ratio_vs_ref_best")
        lines.append(f"| {title} | {row['label']} ({row['mixed_precision']}) | {row['median_step_s']:.3f} s/step | "
                     f"{row.get('peak_vram_mb') or 0:.0f} | {row['time_ratio_vs_ref']:.2f}"
                     + (f" (vs ref_best {best:.2f})" if best else "") + f" | {memory_column(row)} |")
    x = r["sdxl"]
    lines.append(f"| SDXL {x['resolution']} px | {x['label']} ({x.get('mixed_precision')}) | "
                 f"{x['median_step_s']:.3f} s/step | {x.get('peak_vram_mb') or 0:.0f} | | {memory_column(x)} |")
    lines += llm_gpu.markdown_rows(r["llm"])
    lc = r["sd15"]["loss_curves"]
    lines += ["", f"SD1.5 loss curves, max |ours_fp32 - ref| = {lc['max_abs_diff']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--dry-run", action="store_true", help="the CPU-side plan with tiny models (no CUDA needed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench-gpu")
    args = parser.parse_args(argv)
    if args.worker:
        from benchmarks.common import emit

        spec = json.loads(Path(args.spec).read_text())
        if args.worker == "build_sdxl":
            build_sdxl(Path(spec["model"]), spec["size"])
            emit({})
        else:
            emit(sd_compare.worker_ours(spec))
        return 0
    result = run(Path(args.out), Path(args.workdir), args.dry_run)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
