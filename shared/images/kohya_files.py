"""LoRA files in the kohya layout that AUTOMATIC1111, Forge and ComfyUI all load, for every image family.

Key = prefix + module path with "." -> "_", then `.lora_down.weight` (PEFT's A), `.lora_up.weight`
(B) and a 0-dim `.alpha` holding lora_alpha (scale = alpha / rank). Text-encoder names always carry
`text_model_` (transformers 5 dropped that level from CLIPTextModel; without it the hosts ignore every
key). The header metadata tells the hosts which base models the LoRA belongs to; each family keeps its
own table of bases (shared.sd.kohya_export, shared.flux.export) and its own module naming.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from shared.images.lora import lora_modules

NETWORK_MODULE = "networks.lora"


def kohya_state_dict(model, prefix: str, alpha: float | None = None, name_map=None) -> dict:
    """The LoRA weights of `model` (fp16, contiguous) under kohya keys with `prefix`.
    `.alpha` is each module's own lora_alpha (LoCon convs may differ) unless `alpha` is given."""
    import torch

    from shared.images.dora import MAGNITUDE

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


def lora_metadata(
    *,
    family: Mapping[str, str],
    output_name: str,
    rank: int,
    alpha: float,
    base_model: Path,
    resolution: int,
    training: dict,
) -> dict[str, str]:
    """Header metadata A1111/Forge read. Every value must be a string. `family`: the base's entry in its
    family's table (ss_base_model_version, ss_v2, modelspec; optionally network_module and
    implementation)."""
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
