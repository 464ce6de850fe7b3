"""LoRA files in the kohya layout that AUTOMATIC1111, Forge and ComfyUI all load.

Key = prefix + module path with "." -> "_", then `.lora_down.weight` (PEFT's A), `.lora_up.weight`
(B) and a 0-dim `.alpha` holding lora_alpha (scale = alpha / rank). SD1/SD2 use diffusers module
names and `lora_te_`; SDXL uses the LDM names of its UNet (`lora_unet_input_blocks_4_1_...`) and
`lora_te1_`/`lora_te2_`. Text-encoder names always carry `text_model_` (transformers 5 dropped
that level from CLIPTextModel; without it the hosts ignore every key). The header metadata tells
the hosts which base models the LoRA belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.sd.base_model import ARCHITECTURES
from shared.sd.lora import lora_modules

NETWORK_MODULE = "networks.lora"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
# Flux.1 as kohya names it (ss_base_model_version "flux1" for both variants). Forge lists a LoRA under
# Flux when modelspec.implementation is BFL's repository or the architecture is "flux-1-dev/lora"
# (its check misses "flux-1-schnell/lora", so the implementation key is what shows schnell LoRAs).
FLUX_ARCHITECTURES = {
    "flux_dev": {"ss_base_model_version": "flux1", "ss_v2": "False", "modelspec": "flux-1-dev/lora",
                 "implementation": FLUX_IMPLEMENTATION, "network_module": "networks.lora_flux"},
    "flux_schnell": {"ss_base_model_version": "flux1", "ss_v2": "False", "modelspec": "flux-1-schnell/lora",
                     "implementation": FLUX_IMPLEMENTATION, "network_module": "networks.lora_flux"},
}


def kohya_state_dict(model, prefix: str, alpha: float | None = None, name_map=None) -> dict:
    """The LoRA weights of `model` (fp16, contiguous) under kohya keys with `prefix`.
    `.alpha` is each module's own lora_alpha (LoCon convs may differ) unless `alpha` is given."""
    import torch

    from shared.sd.dora import MAGNITUDE

    modules = dict(model.named_modules())
    out = {}
    for name, down, up, module_alpha in lora_modules(model):
        key = prefix + "_" + (name_map(name) if name_map else name).replace(".", "_")
        out[f"{key}.lora_down.weight"] = export_tensor(down)
        out[f"{key}.lora_up.weight"] = export_tensor(up)
        magnitude = getattr(modules[name], MAGNITUDE, None)
        if magnitude is not None:  # DoRA: [1, in(, 1, 1)], the per-input layout A1111 applies
            out[f"{key}.dora_scale"] = export_tensor(magnitude)
        out[f"{key}.alpha"] = torch.tensor(float(module_alpha if alpha is None else alpha), dtype=torch.float16)
    return out


def export_tensor(tensor):
    """A LoRA tensor as the files hold it: fp16, on the CPU, contiguous."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "meta":  # meta: a layout check on a full-size model without weights
        tensor = tensor.to("cpu")
    return tensor.to(torch.float16).contiguous()


def text_encoder_module_name(name: str) -> str:
    return "text_model." + name.removeprefix("text_model.")


def text_encoder_prefixes(arch: str) -> list[str]:
    return ["lora_te1", "lora_te2"] if arch == "sdxl" else ["lora_te"]


def unet_module_name_map(arch: str, unet_config):
    """SDXL LoRAs name UNet modules in the LDM layout; SD1/SD2 keep diffusers names."""
    if arch != "sdxl":
        return None
    from shared.sd.ldm_layout import unet_map

    return unet_map(dict(unet_config)).to_ldm


def model_lora_tensors(arch: str, unet, text_encoders=()) -> dict:
    """Every LoRA of an SD model (UNet and any text encoder that has one) under kohya keys."""
    out = kohya_state_dict(unet, "lora_unet", name_map=unet_module_name_map(arch, unet.config))
    for prefix, encoder in zip(text_encoder_prefixes(arch), text_encoders):
        out.update(kohya_state_dict(encoder, prefix, name_map=text_encoder_module_name))
    return out


def lora_metadata(
    *,
    arch: str,
    output_name: str,
    rank: int,
    alpha: float,
    base_model: Path,
    resolution: int,
    training: dict,
) -> dict[str, str]:
    """Header metadata A1111/Forge read. Every value must be a string. `arch`: an SD family of
    ARCHITECTURES or a key of FLUX_ARCHITECTURES."""
    family = ARCHITECTURES.get(arch) or FLUX_ARCHITECTURES[arch]
    meta = {
        "ss_output_name": output_name,
        "ss_base_model_version": family["ss_base_model_version"],
        "ss_v2": family["ss_v2"],
        "ss_network_module": family.get("network_module", NETWORK_MODULE),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_sd_model_name": Path(base_model).name,
        "ss_resolution": f"({resolution}, {resolution})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family["modelspec"],
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    if "implementation" in family:
        meta["modelspec.implementation"] = family["implementation"]
    for key, value in training.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_lora_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
