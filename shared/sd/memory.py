"""The SD task's part of the memory plan (shared/training/memory.py): its levers and its peak by part.

Sizes come from the model's own structure, built on the meta device from its component configs (the
diffusers folder's config.json files, or for a single file the shipped or given config folder of the
family its header names): no weight is read. The parts:

- `weights`: the frozen UNet, VAE and text encoders in their storage type, less what the caches
  freed: the text encoders with a text cache (it holds every prompt a render uses), the VAE's
  encoder with a latent cache;
- `autocast`: the compute-type copies autocast makes of the UNet's weights each step where they are
  stored wider (fp32 on the CPU under bf16);
- `trainable`: the LoRA weights, their gradients and the optimizer's state (fp32);
- `activations`: the larger of a training step's working set (what the UNet's backward keeps, or the
  VAE encoding an image when latents are not cached) and a sample's (the UNet at batch 2 for
  classifier-free guidance, the VAE decoding an image) when the job renders samples or a preview;
- `caches`: latents and text-encoder outputs kept in RAM (CPU only; they are never on the card);
- `compile`: with `compile: true`, what torch.compile keeps in the process (its graphs and generated
  code), by the UNet's number of modules, fitted to the tiny model and SD1.5 on this CPU;
- `channels_last`: with `channels_last: yes`, what the UNet's NHWC convolution weights add (a share of
  their size, fitted);
- `tokenizers`: the CLIP tokenizers (their BPE vocabulary is read once before the baseline is measured);
- `loading`: what loading and caching cost above the training peak: every weight is held while the
  caches are built (with the VAE encoding an image); a safetensors file is streamed tensor by tensor
  into the storage type, a `.ckpt` is read whole and, in another number type, converted beside it.

The activation figures are elements per latent pixel and channel, per block, fitted to the peaks
measured on this CPU (SD1.5 at 128 and 256 px and the tiny fixture, with and without gradient
checkpointing; docs/memory.md); on CUDA they are estimates until benchmarks/gpu measures them.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.training.memory import (
    Choice,
    Lever,
    MemoryModel,
    checkpointing_lever,
    device_kind,
    dtype_bytes,
    eight_bit_lever,
    micro_batch_lever,
    trainable_bytes,
)

# Saved elements per latent pixel per channel of each block, fitted (see the module docstring)
RESNET = 5.0  # a ResNet block during training (GroupNorm, SiLU and conv inputs)
ATTENTION = 16.0  # a transformer layer (norms, q/k/v, attention output, feed-forward)
DROPOUT = 13.0  # a transformer layer's LoRA dropout copies (one per LoRA module input) ...
MASK = 13.0 / 4  # ... and their masks (one byte per element)
CHECKPOINTED = 1.0  # a checkpointed block keeps its input
INFERENCE = 6.0  # a sample's UNet working set, elements per latent pixel per channel of the top level
VAE_ENCODE = 4.0  # the VAE encoder's working set, elements per pixel per top-level channel
VAE_DECODE = 6.0  # the VAE decoder's
# torch.compile's graphs and generated code held in the process, per UNet module, fitted to two peaks
# measured on this CPU with inductor: the tiny fixture (308 modules) +372 MiB, SD1.5 (709) +1825 MiB
COMPILE_PER_MODULE, COMPILE_BASE, COMPILE_MIN = 3.62 * 2**20, -744 * 2**20, 372 * 2**20
TOKENIZER = 17 * 2**20  # a CLIP tokenizer's vocabulary and merge ranks as Python objects, measured
# what loading imports (the tokenizer's vocabulary ships in open_clip; a single file is converted by diffusers)
IMPORTS = ("peft", "diffusers.pipelines", "diffusers.loaders.single_file_utils", "shared.images.clip_tokenizer", "open_clip")
STEP_TIME = {"cache_latents": 0.8, "cache_text_encoder_outputs": 0.95}  # what a cache saves of a step
# `channels_last: yes`: the process grows by this share of the UNet's convolution weights (their
# NHWC copies are made at load, in the heap, and the heap does not give the freed contiguous ones'
# pages back between the step's activations), fitted to SD1.5 at 256 px on this CPU: +521 and +528 MiB
# over 1123 MiB of bf16 convolution weights. Turned off, a step takes this much longer (0.93x and
# 0.96x the time with it, docs/benchmarks.md).
CHANNELS_LAST = 0.47
CONTIGUOUS_TIME = 1 / 0.945


def unet_levels(config: dict) -> list[tuple[int, float, float]]:
    """(channels, ResNet blocks, transformer layers) at each resolution level of a diffusers UNet,
    counting the down, mid and up blocks (up-block ResNets take the skip too: 1.5 blocks' worth)."""
    channels = list(config["block_out_channels"])
    per_block = config.get("layers_per_block", 2)
    depth = config.get("transformer_layers_per_block") or 1
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)
    levels = []
    for i, kind in enumerate(config["down_block_types"]):
        attention = per_block * depth[i] if "CrossAttn" in kind else 0
        levels.append([channels[i], float(per_block), float(attention)])
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid:
        levels[-1][1] += 2
        levels[-1][2] += depth[-1] if "CrossAttn" in mid else 0
    for j, kind in enumerate(config["up_block_types"]):
        i = len(channels) - 1 - j
        if "CrossAttn" in kind:
            levels[i][2] += (per_block + 1) * depth[i]
        levels[i][1] += 1.5 * (per_block + 1)
    return [tuple(level) for level in levels]


def unet_activations(config: dict, latent_pixels: int, batch: int, nbytes: int, *, checkpointing: bool,
                     dropout: bool) -> float:
    """Bytes a training step's backward keeps (and the block it recomputes, with checkpointing)."""
    total, largest = 0.0, 0.0
    for i, (channels, resnets, layers) in enumerate(unet_levels(config)):
        pixels = latent_pixels / 4**i * batch
        per_layer = ATTENTION * nbytes + (DROPOUT * nbytes + MASK * 4 if dropout else 0)
        full = pixels * channels * (resnets * RESNET * nbytes + layers * per_layer)
        if checkpointing:
            total += pixels * channels * (resnets + layers) * CHECKPOINTED * nbytes
            largest = max(largest, pixels * channels * max(RESNET * nbytes, per_layer if layers else 0))
        else:
            total += full
    return total + largest


def autocast_copies(module, weight_bytes: int, compute_bytes: int) -> float:
    """Bytes of the compute-type copies autocast makes of a module's matmul and convolution weights
    when they are stored in a wider type (fp32 on the CPU under bf16): made in the forward, kept for
    the backward, so the step holds both."""
    import torch

    if compute_bytes >= weight_bytes:
        return 0.0
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return float(sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds)) * compute_bytes)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(module, targets: list[str], rank: int, conv_targets: list[str] = (), conv_rank: int = 0,
                dora: bool = False) -> int:
    """Weights LoRA adds on the named modules: A (in x rank, with the conv kernel) and B (rank x out)."""
    import torch

    modules = dict(module.named_modules())
    total = 0
    for name in dict.fromkeys([*targets, *conv_targets]):
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features) + (m.out_features if dora else 0)
        elif isinstance(m, torch.nn.Conv2d):
            kernel = m.kernel_size[0] * m.kernel_size[1]
            r = conv_rank if kernel > 1 and name in conv_targets else rank
            total += r * (m.in_channels * kernel + m.out_channels) + (m.out_channels if dora else 0)
    return total


def component_configs(cfg) -> dict[str, dict]:
    """The unet/vae/text_encoder configs the loader builds the model from (no weights read)."""
    from shared.model_family import model_family
    from shared.sd.base_model import SHIPPED_CONFIG, read_component_configs, shipped_config_dir

    base = Path(cfg.base_model)
    if base.is_dir():
        return read_component_configs(base)
    if cfg.model_config:
        return read_component_configs(Path(cfg.model_config))
    arch = model_family(base, None, "sd").arch  # a .ckpt is not read before loading: SD1.5's sizes
    return read_component_configs(shipped_config_dir(arch if arch in SHIPPED_CONFIG else "sd1"))


def meta_model(configs: dict):
    """(unet, vae, text encoders) built on the meta device: their structure without weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from shared.sd.base_model import _text_encoder

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = [_text_encoder(configs["text_encoder"], False)]
        if "text_encoder_2" in configs:
            encoders.append(_text_encoder(configs["text_encoder_2"], True))
    return unet, vae, encoders


def sd_memory_model(cfg, precision, images: int, captions: int) -> MemoryModel:
    """The levers and the estimate of an SD job (see the module docstring). `images`, `captions`: the
    data set's images and distinct captions (for the caches)."""
    import torch

    from shared.images.lora import kohya_conv_targets, kohya_text_encoder_targets, kohya_unet_targets

    device = device_kind(precision.device)
    configs = component_configs(cfg)
    unet, vae, encoders = meta_model(configs)
    weight = dtype_bytes(precision.weight_dtype)
    compute = dtype_bytes(torch.bfloat16 if precision.mixed_precision in ("bf16", "fp16") else torch.float32)
    vae_bytes = 4 if configs["vae"].get("force_upcast") else weight
    sizes = {"unet": params(unet) * weight, "vae": params(vae) * vae_bytes,
             "text": sum(params(e) for e in encoders) * weight}
    # the half of the VAE a latent cache frees (renders only decode)
    vae_encoder = (params(vae.encoder) + (params(vae.quant_conv) if vae.quant_conv is not None else 0)) * vae_bytes
    lora = lora_params(unet, kohya_unet_targets(unet), cfg.lora_rank,
                       kohya_conv_targets(unet) if cfg.conv_rank else [], cfg.conv_rank, cfg.use_dora)
    if cfg.train_text_encoder:
        lora += sum(lora_params(e, kohya_text_encoder_targets(e), cfg.lora_rank, dora=cfg.use_dora) for e in encoders)
    top_vae = configs["vae"]["block_out_channels"][0]
    top_unet = configs["unet"]["block_out_channels"][0]
    hidden = sum(e.config.hidden_size for e in encoders)
    tokens = 77
    pixels = cfg.resolution**2
    latent_pixels = pixels // 64
    samples = bool(cfg.sample_prompts) or cfg.preview
    autocast = autocast_copies(unet, weight, compute)
    nhwc = CHANNELS_LAST * sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Conv2d)) * weight
    compiled = max(COMPILE_MIN, COMPILE_BASE + COMPILE_PER_MODULE * sum(1 for _ in unet.modules()))
    loading = _loading_bytes(cfg, sum(params(m) for m in (unet, vae, *encoders)), sum(sizes.values()))

    def estimate(s) -> dict[str, float]:
        batch = s["batch_size"]
        latents_cached, text_cached = s["cache_latents"] != "no", s["cache_text_encoder_outputs"] == "yes"
        # what a cache replaced is freed after caching (shared/sd/task.py)
        weights = (sizes["unet"] + sizes["vae"] - (vae_encoder if latents_cached else 0)
                   + (0 if text_cached else sizes["text"]))
        step = unet_activations(configs["unet"], latent_pixels, batch, compute,
                                checkpointing=s["gradient_checkpointing"], dropout=cfg.lora_dropout > 0)
        if not latents_cached:
            step = max(step, VAE_ENCODE * top_vae * pixels * batch * vae_bytes)
        work = step
        if samples:
            sample = max(INFERENCE * top_unet * latent_pixels * 2 * compute, VAE_DECODE * top_vae * pixels * vae_bytes)
            work = max(work, sample)  # a text cache holds every prompt a render uses
        caches = 0.0
        if device == "cpu":
            flips = 2 if cfg.random_flip else 1
            caches += (images * flips * 8 * latent_pixels * 4) if latents_cached else 0
            caches += (captions * tokens * hidden * weight) if text_cached else 0  # the encoders' type
        parts = {"compile": compiled if cfg.compile else 0.0, "weights": weights, "autocast": autocast, "tokenizers": TOKENIZER * len(encoders), "trainable": trainable_bytes(lora, s.get("optimizer", "adamw")),
                 "activations": work, "caches": caches}
        parts["channels_last"] = nhwc if s["channels_last"] == "yes" else 0.0  # from the load on
        # before the caches free the encoders, every weight is loaded while the VAE encodes an image
        caching = sum(sizes.values()) + (VAE_ENCODE * top_vae * pixels * vae_bytes if latents_cached else 0)
        parts["loading"] = max(0.0, max(loading, caching) + parts["channels_last"] - sum(parts.values()))
        return parts

    levers = [checkpointing_lever(cfg), micro_batch_lever(cfg, device)]
    levers += [lever for lever in (eight_bit_lever(cfg, device), *_cache_levers(cfg), _channels_last_lever(cfg)) if lever]
    hints = {"weights": "the model's size: mixed_precision bf16 stores the base in 2 bytes per weight",
             "activations": "resolution or batch_size, or set gradient_checkpointing: true",
             "trainable": "lora_rank (or conv_rank)", "caches": "the number of images, or cache_latents: disk",
             "loading": "the checkpoint's size: use a diffusers folder or a file in the storage type"}
    return MemoryModel(levers=levers, estimate=estimate, hints=hints, imports=IMPORTS,
                       warm=_read_vocabulary)


def _read_vocabulary() -> None:
    """The BPE vocabulary every CLIP tokenizer is built from, read once and kept for the run."""
    from shared.images.clip_tokenizer import clip_vocab_and_merges

    clip_vocab_and_merges()


def _cache_levers(cfg) -> list[Lever]:
    """Caching latents and text-encoder outputs where the config's rules allow it: a step then runs
    neither the VAE nor the text encoders (a cached step trains the same numbers as an uncached one)."""
    from shared import schema

    levers = []
    for key, on in (("cache_latents", "memory"), ("cache_text_encoder_outputs", "yes")):
        value = getattr(cfg, key)
        if value != "no":
            levers.append(Lever(key, (Choice({key: value}),)))
            continue
        values = {name: getattr(cfg, name) for name in schema.TRAIN}
        values[key] = on
        if any(rule.check(values) for rule in schema.RULES if key in rule.keys):
            levers.append(Lever(key, (Choice({key: value}),)))
            continue
        levers.append(Lever(key, (Choice({key: value}), Choice({key: on}, STEP_TIME[key], f"{key}: {on}"))))
    return levers


def _channels_last_lever(cfg) -> Lever:
    """The contiguous layout as the leaner, slower choice when `channels_last` is on (it trains the
    same numbers, to rounding)."""
    if cfg.channels_last != "yes":
        return Lever("channels_last", (Choice({"channels_last": cfg.channels_last}),))
    return Lever("channels_last", (Choice({"channels_last": "yes"}),
                                   Choice({"channels_last": "no"}, CONTIGUOUS_TIME, "channels_last: no")))


def _loading_bytes(cfg, n_params: int, stored: float) -> float:
    """Loading streams each tensor into its storage type (shared/weight_files.py): a safetensors file
    costs the stored model plus one tensor. A `.ckpt` is unpickled whole first, then converted beside it."""
    base = Path(cfg.base_model)
    if not base.is_file() or base.suffix.lower() == ".safetensors":
        return stored
    size = os.path.getsize(base)
    per_weight = size / max(n_params, 1)
    converted = stored if abs(per_weight - stored / max(n_params, 1)) > 0.5 else 0
    return size + converted
