"""SD1.5 LoRA training: our trainer (defaults, and with the latent + text-encoder caches) against the
textbook reference loop (benchmarks/sd_reference.py), on the full SD1.5 architecture with random
weights, one image, batch 1. Each variant runs in its own process (clean peak memory); the runs
alternate (ref, ours, ours cached, ref, ...) so a change in the machine's load hits all of them.

    python -m benchmarks.sd_compare [--size full|tiny] [--steps N] [--rounds R]
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import compare_main, count_flops, emit, median, run_worker, step_times

SIZES = {  # resolution in pixels, the config source
    "full": {"resolution": 256, "configs": "sd15"},
    "tiny": {"resolution": 64, "configs": "tiny"},
    "gpu": {"resolution": 512, "configs": "sd15"},  # benchmarks/gpu: CUDA, bf16
}
VARIANTS = ("ref", "ours", "ours_cached")
LABELS = {"ref": "reference (diffusers + peft)", "ours": "ours (defaults)", "ours_cached": "ours (latent+TE cache)"}


def component_configs(which: str) -> dict:
    if which == "tiny":
        from shared.fixtures.tiny_sd import TINY_SD15

        return TINY_SD15
    from shared.sd.base_model import shipped_config_dir

    folder = Path(shipped_config_dir("sd1"))
    return {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}


def build_model(folder: Path, which: str, seed: int = 0) -> Path:
    """A diffusers folder with random weights of the given layout (written once, then reused)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from shared.images.clip_tokenizer import clip_tokenizer
    from shared.sd.base_model import shipped_config_dir

    marker = folder / ".complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    configs = component_configs(which)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    te = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    CLIPTextModel(CLIPTextConfig(**te)).save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    shipped = Path(shipped_config_dir("sd1"))
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    marker.write_text("ok")
    return folder


def make_data(folder: Path, resolution: int) -> Path:
    """One square image at the training resolution (no resize, no crop) and its caption."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    pixels = np.stack([x, y, 1 - x * y], -1) * 200 + rng.uniform(0, 55, (resolution, resolution, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "img0.png")
    (folder / "img0.txt").write_text("a photo of a red bench in a park, bright afternoon light")
    return folder


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def worker_ours(spec: dict, cached: bool) -> dict:
    import torch

    from shared.config import config_from_dict
    from shared.images.lora import lora_state
    from shared.reporting import Reporter
    from shared.sd.task import SDTask
    from shared.train import run_training

    torch.set_num_threads(spec["threads"])
    stamps, losses = [], []
    started = {}

    class Recorder(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "started":
                started["t"] = time.perf_counter()
            if kind == "progress":
                stamps.append(time.perf_counter())
                losses.append(data["loss"])

    if spec.get("dump_lora_init"):  # the starting LoRA weights, so the reference can start there too
        original = SDTask.build_caches

        def build_caches(self):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in lora_state(self.model.unet).items()}, spec["dump_lora_init"])
            return original(self)

        SDTask.build_caches = build_caches
    extra = {"cache_latents": "memory", "cache_text_encoder_outputs": True} if cached else {}
    cfg = config_from_dict(dict(
        base_model=spec["model"], train_data_dir=spec["data"], output_dir=spec["out"], resolution=spec["resolution"],
        batch_size=spec["batch_size"], max_train_steps=spec["steps"], save_steps=0, lora_rank=spec["rank"],
        lora_alpha=spec["alpha"], lora_dropout=0.0, learning_rate=spec["lr"], seed=spec["seed"], device=spec.get("device", "cpu"),
        mixed_precision=spec.get("mixed_precision", "no"),
        **extra))
    t0 = time.perf_counter()
    run_training(cfg, Recorder())
    return {"step_s": step_times(stamps, spec["warmup"]), "losses": losses, "setup_s": started["t"] - t0,
            "total_s": time.perf_counter() - t0}


def worker_ref(spec: dict) -> dict:
    import torch

    from benchmarks import sd_reference

    torch.set_num_threads(spec["threads"])
    stamps, losses = [], []

    def on_step(step, loss):
        stamps.append(time.perf_counter())
        losses.append(loss)

    t0 = time.perf_counter()
    loop = sd_reference.train(spec, on_step)
    out = {"step_s": step_times(stamps, spec["warmup"]), "losses": losses, "total_s": time.perf_counter() - t0,
           "lora_modules": loop["n_lora_modules"], "trainable_params": loop["trainable"]}
    if spec.get("count_flops"):
        vae, te, unet = loop["vae"], loop["text_encoder"], loop["unet"]
        raw = next(iter(loop["loader"]))
        batch = {"pixel_values": raw["pixel_values"].to(vae.device, vae.dtype), "input_ids": raw["input_ids"].to(te.device)}
        with torch.no_grad():
            out["flops_vae_encode"] = count_flops(lambda: vae.encode(batch["pixel_values"]))
            out["flops_text_encoder"] = count_flops(lambda: te(batch["input_ids"]))
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.mode()
            ehs = te(batch["input_ids"])[0]
        t = torch.tensor([500] * latents.shape[0], device=latents.device)

        def unet_step():
            pred = unet(latents, t, ehs).sample
            pred.float().pow(2).mean().backward()

        out["flops_unet_fwd_bwd"] = count_flops(unet_step)
    return out


# ---------------------------------------------------------------------------------------------
# The comparison


def run(workdir: Path, size: str = "full", steps: int = 6, warmup: int = 2, rounds: int = 2, threads: int = 1,
        model_cache: Path | None = None, log=print, device: str = "cpu", mixed_precision: str = "no") -> dict:
    from benchmarks.common import matmul_flops

    info = SIZES[size]
    workdir.mkdir(parents=True, exist_ok=True)
    model = (model_cache or workdir) / f"sd15-{size}-random"
    t = time.perf_counter()
    run_worker("sd_compare", "build", {"threads": threads, "model": str(model), "configs": info["configs"]}, workdir)
    log(f"SD: model folder ready in {time.perf_counter() - t:.0f} s ({model})")
    data = make_data(workdir / "sd-data", info["resolution"])
    base = dict(model=str(model), data=str(data), resolution=info["resolution"], batch_size=1, steps=warmup + steps,
                warmup=warmup, rank=8, alpha=16.0, lr=2e-4, seed=42, threads=threads, device=device,
                mixed_precision=mixed_precision)
    init = workdir / "sd-lora-init.safetensors"
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    order = ["ours", "ref", "ours_cached"]  # ours first: the reference starts from the LoRA weights it wrote
    for r in range(rounds):
        for variant in order[r % 3:] + order[:r % 3]:  # rotate: each variant runs early and late
            spec = {**base, "out": str(workdir / f"sd-out-{variant}-{r}"), "lora_init": str(init)}
            if variant == "ours" and r == 0:
                spec["dump_lora_init"] = str(init)
            if variant == "ref" and r == 0:
                spec["count_flops"] = True
            result = run_worker("sd_compare", variant, spec, workdir)
            runs[variant].append(result)
            log(f"SD: {LABELS[variant]} round {r + 1}: median {median(result['step_s']):.3f} s/step, "
                f"peak RSS {result['peak_rss_mb']:.0f} MiB, load {result['load_avg'][1]:.1f}")
    import torch

    peak = matmul_flops(threads, device=device, dtype=torch.bfloat16 if mixed_precision == "bf16" else None)
    return summarise(runs, base, peak, size)


def summarise(runs: dict, base: dict, peak_flops: float, size: str) -> dict:
    ref_flops = runs["ref"][0]
    f_unet = ref_flops.get("flops_unet_fwd_bwd", 0)
    f_full = f_unet + ref_flops.get("flops_vae_encode", 0) + ref_flops.get("flops_text_encoder", 0)
    flops = {"ref": f_full, "ours": f_full, "ours_cached": f_unet}
    rows = {}
    for variant, results in runs.items():
        times = [t for r in results for t in r["step_s"]]
        s = median(times)
        rows[variant] = {
            "label": LABELS[variant], "median_step_s": s, "images_per_s": base["batch_size"] / s if s else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "step_s_all": times, "runs": len(results),
            "flops_per_step": flops[variant], "mfu": flops[variant] / s / peak_flops if s and peak_flops else None,
            "load_avg": [r["load_avg"] for r in results],
            "peak_vram_mb": max((r.get("peak_vram_mb", 0) for r in results), default=0) or None,
        }
    ref = rows["ref"]
    for row in rows.values():
        row["time_ratio_vs_ref"] = row["median_step_s"] / ref["median_step_s"]
        row["rss_ratio_vs_ref"] = row["peak_rss_mb"] / ref["peak_rss_mb"]
    ours_losses, ref_losses = runs["ours"][0]["losses"], runs["ref"][0]["losses"]
    n = min(len(ours_losses), len(ref_losses))
    diffs = [abs(a - b) for a, b in zip(ours_losses[:n], ref_losses[:n])]
    return {
        "size": size, "settings": {k: v for k, v in base.items() if k not in ("model", "data")},
        "lora_modules_ref": ref_flops.get("lora_modules"), "trainable_params_ref": ref_flops.get("trainable_params"),
        "matmul_flops_per_s": peak_flops, "variants": rows,
        "loss_curves": {"ours": ours_losses[:n], "ref": ref_losses[:n], "steps": n,
                        "max_abs_diff": max(diffs) if diffs else None,
                        "max_rel_diff": max(d / max(abs(b), 1e-12) for d, b in zip(diffs, ref_losses)) if diffs else None,
                        "ours_cached": runs["ours_cached"][0]["losses"][:n]},
    }


def worker_main(name: str, spec: dict) -> None:
    if name == "build":
        build_model(Path(spec["model"]), spec["configs"])
        emit({})
    elif name == "ref":
        emit(worker_ref(spec))
    else:
        emit(worker_ours(spec, cached=name == "ours_cached"))


def main(argv=None) -> int:
    return compare_main(argv, doc=__doc__, sizes=SIZES, default_steps=6, section="sd", run=run,
                        worker_main=worker_main)


if __name__ == "__main__":
    sys.exit(main())
