"""One fixed UNet call of a tiny SD model (text conditioning included), to compare models' outputs."""

from __future__ import annotations

import torch

from shared.images.dataset import tokenize
from shared.sd.conditioning import encode_text, sdxl_time_ids, unet_kwargs

CAPTIONS = ["a red circle", "a blue square"]


def forward(model, seed: int = 0):
    """(UNet output, text conditioning) for fixed latents, timesteps and captions."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ehs, pooled = encode_text(model, tokenize(model.tokenizers, CAPTIONS))
    extra = {}
    if model.is_sdxl:
        extra = unet_kwargs(model, pooled, sdxl_time_ids([(64, 64)] * 2, [(0, 0)] * 2, [(64, 64)] * 2))
    return model.unet(latents, t, ehs, **extra).sample, ehs


def with_diffusers_lora(model, lora_path):
    """`model` with a LoRA file loaded by diffusers' own loader (an implementation independent of ours)."""
    from shared.sd.sampling import build_pipeline

    build_pipeline(model).load_lora_weights(str(lora_path), adapter_name="probe")
    return model
