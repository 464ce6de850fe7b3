"""FLUX.1-dev at full size on a CUDA GPU, through the Flux task: s/step and peak VRAM of a LoRA run at
1024 px, rank 16, for the memory levers: bf16 base, fp8 base, and block swap on top of each.

Random weights of the published transformer (19 double + 38 single blocks, 3072 wide) and autoencoder,
nothing downloaded; the text encoders have the real output widths (T5 4096, CLIP-L 768) but one layer
each, since the task caches their outputs and frees them before training (the numbers are the
transformer's). Each variant runs `train` in its own process: the task's memory plan (fp8_base,
blocks_to_swap as set, gradient checkpointing on), its latent and text caches, its LoRA targets and
flow-matching loss; peak VRAM is counted from the first training step.

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
    "bf16": {"fp8_base": "false", "swap": 0},
    "fp8 base": {"fp8_base": "true", "swap": 0},
    "fp8 base + swap 20": {"fp8_base": "true", "swap": 20},
    "bf16 + swap 20": {"fp8_base": "false", "swap": 20},
}
# one-layer text encoders with FLUX.1's output widths (what the transformer reads)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768)
T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
          vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
          layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
          tie_word_embeddings=False, use_cache=False, is_gated_act=True, dense_act_fn="gelu_new")


def plan(dry_run: bool) -> dict:
    if dry_run:
        return {"device": "cpu", "size": "tiny", "resolution": 64, "steps": 2, "warmup": 1, "swap_scale": 0.1}
    return {"device": "cuda", "size": "dev", "resolution": 1024, "steps": 5, "warmup": 2, "swap_scale": 1.0}


def _configs(size: str) -> dict:
    from shared.fixtures.tiny_flux import tiny_configs
    from shared.flux.base_model import shipped_config_dir

    if size == "tiny":
        return tiny_configs("dev")
    shipped = shipped_config_dir("dev")
    return {"transformer": json.loads((shipped / "transformer" / "config.json").read_text()),
            "vae": json.loads((shipped / "vae" / "config.json").read_text()), "text_encoder": CLIP_L,
            "text_encoder_2": T5}


def prepare(folder: Path, size: str, resolution: int) -> dict:
    """The files a run reads: a header-only transformer file (what the task reads the family and blocks
    from), the T5 tokenizer folder and one image."""
    from shared.fixtures.images import make_image_folder
    from shared.fixtures.tiny_flux import build_t5_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = _configs(size)["transformer"]
    shapes = {"img_in.weight": [1, 1], "txt_in.weight": [1, 1], "guidance_in.in_layer.weight": [1, 1]}
    shapes |= {f"double_blocks.{i}.img_attn.qkv.weight": [1, 1] for i in range(config["num_layers"])}
    shapes |= {f"single_blocks.{i}.linear1.weight": [1, 1] for i in range(config["num_single_layers"])}
    header = json.dumps({k: {"dtype": "BF16", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}).encode()
    transformer = folder / f"flux1-{size}-random.safetensors"
    transformer.write_bytes(len(header).to_bytes(8, "little") + header)
    tokenizer = folder / "t5_tokenizer"
    if not tokenizer.is_dir():
        build_t5_tokenizer().save_pretrained(tokenizer)
    images = make_image_folder(folder / f"images-{resolution}", count=1, size=(resolution, resolution))
    return {"transformer": str(transformer), "t5_tokenizer": str(tokenizer), "images": str(images)}


def random_model(spec: dict, base_model, *, t5_tokenizer=None, dtype=None, fp8_base=False, **_files):
    """What shared.flux.base_model.load_flux_model returns, with random weights of the plan's size, the
    transformer built on the device (no 24 GB host copy)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from shared.flux.base_model import FluxModel, shipped_config_dir
    from shared.flux.fp8 import store_in_fp8
    from shared.flux.tokenizers import clip_tokenizer, load_t5_tokenizer

    device = torch.device(spec["device"])
    configs = _configs(spec["size"])
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(configs["transformer"])
    transformer.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.data = torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 0.02
    if fp8_base:
        store_in_fp8(transformer)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(configs["vae"]).to(dtype)
    clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    t5 = T5EncoderModel(T5Config(**{k: v for k, v in configs["text_encoder_2"].items() if k != "architectures"}))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads((shipped_config_dir("dev") / "scheduler" / "scheduler_config.json").read_text()))
    models = [m.to(dtype).requires_grad_(False).eval() for m in (transformer, vae, clip, t5)]
    return FluxModel("dev", *models, clip_tokenizer(), load_t5_tokenizer(Path(t5_tokenizer), 512), scheduler,
                     {"transformer": Path(base_model), "t5_tokenizer": Path(t5_tokenizer)})


def worker(spec: dict) -> dict:
    import functools

    import torch

    import shared.flux.task as flux_task
    from benchmarks.flux_memory import train_through_task

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    flux_task.load_flux_model = functools.partial(random_model, spec)
    swap = max(0, round(spec["swap"] * spec["swap_scale"]))
    steps = spec["warmup"] + spec["steps"]
    files = spec["files"]
    values = dict(base_model=files["transformer"], t5_tokenizer=files["t5_tokenizer"], train_data_dir=files["images"],
                  output_dir=spec["out"], resolution=spec["resolution"], batch_size=1, max_train_steps=steps,
                  save_steps=0, lora_rank=16, lora_alpha=16.0, lora_dropout=0.0, learning_rate=1e-4, seed=0,
                  device=spec["device"], mixed_precision="bf16", gradient_checkpointing=True, cache_latents="memory",
                  flux_text_cache="memory", timestep_sampling="flux_shift", preview=False, fp8_base=spec["fp8_base"],
                  blocks_to_swap=str(swap))
    out = train_through_task(values, spec["warmup"], torch.cuda.reset_peak_memory_stats if cuda else None)
    out["blocks_swapped"] = swap
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run(out: Path, workdir: Path, dry_run: bool) -> dict:
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/flux_gpu needs a CUDA GPU (torch.cuda.is_available() is False here); "
                         "add --dry-run to check this script's plan on the CPU with the tiny model")
    p = plan(dry_run)
    started = time.time()
    files = prepare(workdir / f"flux-{p['size']}", p["size"], p["resolution"])
    result = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": dry_run,
              "machine": machine(), "settings": p, "variants": {}}
    for label, variant in VARIANTS.items():
        spec = {**p, **variant, "threads": 1, "files": files,
                "out": str(workdir / f"out-{label.replace(' ', '_').replace('+', '')}")}
        try:
            r = run_worker("gpu.flux_gpu", "step", spec, workdir, timeout=900)
        except RuntimeError as exc:  # e.g. out of memory on a smaller card: record it, go on
            result["variants"][label] = {"error": str(exc).splitlines()[-1][:300]}
            continue
        result["variants"][label] = {"median_step_s": median(r["step_s"]), "peak_vram_mb": r.get("peak_vram_mb"),
                                     "peak_rss_mb": r["peak_rss_mb"], "blocks_swapped": r["blocks_swapped"],
                                     "block_weight_on_device_mb": r["block_weight_on_device_mb"],
                                     "losses": r["losses"],
                                     "gpu": r.get("gpu")}
    result["wall_s"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    name = "flux-gpu-dry-run" if dry_run else "flux-gpu-latest"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    (out / f"{name}.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"Flux {'tiny (dry run)' if r['dry_run'] else 'FLUX.1-dev size'} LoRA rank 16 at {s['resolution']} px, "
             f"batch 1, gradient checkpointing, through the Flux task, {r['wall_s'] / 60:.1f} min", "",
             "| variant | s/step | peak VRAM MiB | peak RSS MiB | frozen block weights on the card MiB |",
             "|---|---:|---:|---:|---:|"]
    for label, v in r["variants"].items():
        if "error" in v:
            lines.append(f"| {label} | failed: {v['error']} | | | |")
            continue
        vram = f"{v['peak_vram_mb']:.0f}" if v.get("peak_vram_mb") else "n/a"
        lines.append(f"| {label} | {v['median_step_s']:.3f} | {vram} | {v['peak_rss_mb']:.0f} | "
                     f"{v['block_weight_on_device_mb']:.1f} |")
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
