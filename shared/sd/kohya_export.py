"""SD LoRA files in the kohya layout that AUTOMATIC1111, Forge and ComfyUI all load (the writer they
share with Flux is shared/images/kohya_files.py).

SD1/SD2 use diffusers module names and `lora_te_`; SDXL uses the LDM names of its UNet
(`lora_unet_input_blocks_4_1_...`) and `lora_te1_`/`lora_te2_`. The header metadata names the SD
family (ARCHITECTURES) so the hosts show the LoRA for the right checkpoints.
"""

from __future__ import annotations

from shared.images.kohya_files import export_tensor as export_tensor  # SD modules take the writers from here
from shared.images.kohya_files import kohya_state_dict, text_encoder_module_name
from shared.images.kohya_files import lora_metadata as kohya_metadata
from shared.images.kohya_files import save_lora_file as save_lora_file
from shared.sd.base_model import ARCHITECTURES


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


def lora_metadata(*, arch: str, **fields) -> dict[str, str]:
    """Header metadata A1111/Forge read for an SD LoRA (`arch`: a key of ARCHITECTURES); the other fields
    are shared.images.kohya_files.lora_metadata's."""
    return kohya_metadata(family=ARCHITECTURES[arch], **fields)
