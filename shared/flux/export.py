"""Flux LoRA files in the kohya naming on BFL module names, which ComfyUI, Forge and diffusers load.

Keys: `lora_unet_` + the BFL module path with dots as underscores (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`), then `.lora_down.weight` [r, in], `.lora_up.weight` [out, r]
and a 0-dim `.alpha`; CLIP-L modules as `lora_te1_text_model_encoder_layers_N_...` (the hosts' name
for Flux's CLIP-L, with the `text_model` level transformers 5 no longer has). A fused module's down is
the A its parts share and its up their B matrices stacked in the BFL row order, so the file is
exactly the trained LoRA (see shared.flux.lora). Header metadata names the base: ss_base_model_version
`flux1`, modelspec.architecture `flux-1-dev/lora` or `flux-1-schnell/lora` and BFL's implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.flux.layout import BflLinear, lora_name
from shared.flux.lora import ADAPTER, trained_targets
from shared.images.kohya_files import (
    export_tensor,
    kohya_state_dict,
    lora_metadata,
    save_lora_file,
    text_encoder_module_name,
)

TE_PREFIX = "lora_te1"
SIDECAR_SD_VERSION = "Flux"  # the sidecar .json "sd version" Forge's Lora tab filters by
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
# Flux.1 as kohya names it (ss_base_model_version "flux1" for both variants). Forge lists a LoRA under
# Flux when modelspec.implementation is BFL's repository or the architecture is "flux-1-dev/lora"
# (its check misses "flux-1-schnell/lora", so the implementation key is what shows schnell LoRAs).
FLUX_ARCHITECTURES = {
    "dev": {"ss_base_model_version": "flux1", "ss_v2": "False", "modelspec": "flux-1-dev/lora",
            "implementation": FLUX_IMPLEMENTATION, "network_module": "networks.lora_flux"},
    "schnell": {"ss_base_model_version": "flux1", "ss_v2": "False", "modelspec": "flux-1-schnell/lora",
                "implementation": FLUX_IMPLEMENTATION, "network_module": "networks.lora_flux"},
}


def flux_lora_tensors(transformer, text_encoder=None) -> dict:
    """Every LoRA of a Flux model (transformer, and CLIP-L when it has LoRA) under kohya keys."""
    import torch

    modules = dict(transformer.named_modules())
    out = {}
    for target in trained_targets(transformer):
        layers = [modules[p] for p in target.parts]
        key = lora_name(target.name)
        out[f"{key}.lora_down.weight"] = export_tensor(layers[0].lora_A[ADAPTER].weight)
        out[f"{key}.lora_up.weight"] = export_tensor(torch.cat([m.lora_B[ADAPTER].weight for m in layers], dim=0))
        out[f"{key}.alpha"] = torch.tensor(float(layers[0].lora_alpha[ADAPTER]), dtype=torch.float16)
    if text_encoder is not None:
        out.update(kohya_state_dict(text_encoder, TE_PREFIX, name_map=text_encoder_module_name))
    return out


def expected_modules(targets: Iterable[BflLinear], text_encoder_targets: Iterable[str] = ()) -> set[str]:
    """The kohya module names a file for these targets holds (each with down, up and alpha)."""
    names = {lora_name(t.name) for t in targets}
    names |= {f"{TE_PREFIX}_" + text_encoder_module_name(n).replace(".", "_") for n in text_encoder_targets}
    return names


def file_modules(tensors: Mapping[str, Any]) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors}


def flux_lora_metadata(*, variant: str, output_name: str, rank: int, alpha: float, base_model: Path,
                       resolution: int, training: dict) -> dict[str, str]:
    """The header A1111/Forge/kohya tools read, for FLUX.1-dev or -schnell."""
    return lora_metadata(family=FLUX_ARCHITECTURES[variant], output_name=output_name, rank=rank, alpha=alpha,
                         base_model=base_model, resolution=resolution, training=training)


def save_flux_lora(path: Path, transformer, text_encoder, metadata: dict[str, str]) -> Path:
    save_lora_file(Path(path), flux_lora_tensors(transformer, text_encoder), metadata)
    return Path(path)
