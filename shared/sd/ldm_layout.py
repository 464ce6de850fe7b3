"""Names in the original (LDM / "single file") layout of SD checkpoints, from diffusers names.

diffusers can read LDM files (`diffusers.loaders.single_file_utils`) but ships no writer. We need
the other direction twice: to save test fixtures and the demo model as real single-file
checkpoints, and to name SDXL LoRA modules the way kohya, A1111 and ComfyUI expect
(`lora_unet_input_blocks_4_1_...`). Both are derived from the model config, so any block layout
maps, not just the published sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D attribute -> LDM ResBlock attribute
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class _PrefixMap:
    """An ordered list of (diffusers prefix, LDM prefix, attribute renames) rules."""

    def __init__(self) -> None:
        self.rules: list[tuple[str, str, Mapping[str, str]]] = []

    def add(self, diffusers: str, ldm: str, renames: Mapping[str, str] | None = None) -> None:
        self.rules.append((diffusers, ldm, renames or {}))

    def to_ldm(self, name: str) -> str:
        """Map a diffusers parameter or module name to its LDM name; KeyError when no rule fits."""
        best = None
        for diffusers, ldm, renames in self.rules:
            if (name == diffusers or name.startswith(diffusers + ".")) and (
                best is None or len(diffusers) > len(best[0])
            ):
                best = (diffusers, ldm, renames)
        if best is None:
            raise KeyError(name)
        diffusers, ldm, renames = best
        rest = name[len(diffusers) :]
        for old, new in renames.items():
            if rest == "." + old or rest.startswith("." + old + "."):
                rest = "." + new + rest[len(old) + 1 :]
                break
        return ldm + rest


def unet_map(config: Mapping[str, Any]) -> _PrefixMap:
    m = _PrefixMap()
    m.add("time_embedding.linear_1", "time_embed.0")
    m.add("time_embedding.linear_2", "time_embed.2")
    m.add("conv_in", "input_blocks.0.0")
    m.add("conv_norm_out", "out.0")
    m.add("conv_out", "out.2")
    if config.get("addition_embed_type") == "text_time":
        m.add("add_embedding.linear_1", "label_emb.0.0")
        m.add("add_embedding.linear_2", "label_emb.0.2")
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("per-block layers_per_block lists are not an SD/SDXL layout")
    down_types = config["down_block_types"]
    up_types = config["up_block_types"]
    n = len(down_types)
    for i, kind in enumerate(down_types):
        for j in range(per_block):
            k = 1 + i * (per_block + 1) + j
            m.add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET)
            if "CrossAttn" in kind:
                m.add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1")
        if i < n - 1:
            m.add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (per_block + 1) + per_block}.0.op")
    m.add("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    m.add("mid_block.attentions.0", "middle_block.1")
    m.add("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for i, kind in enumerate(up_types):
        has_attention = "CrossAttn" in kind
        for j in range(per_block + 1):
            k = i * (per_block + 1) + j
            m.add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET)
            if has_attention:
                m.add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1")
        if i < n - 1:
            k = i * (per_block + 1) + per_block
            m.add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if has_attention else 1}.conv")
    return m


def vae_map(config: Mapping[str, Any]) -> _PrefixMap:
    m = _PrefixMap()
    n = len(config["block_out_channels"])
    for part in ("encoder", "decoder"):
        m.add(f"{part}.conv_in", f"{part}.conv_in")
        m.add(f"{part}.conv_out", f"{part}.conv_out")
        m.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        m.add(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        m.add(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        m.add(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    per_block = config.get("layers_per_block", 2)
    for i in range(n):
        for j in range(per_block):
            m.add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        m.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        ldm_i = n - 1 - i  # the LDM decoder numbers its levels from the bottom
        for j in range(per_block + 1):
            m.add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}", _VAE_RESNET)
        m.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv")
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")
    return m


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    m = unet_map(config)
    return {UNET_PREFIX + m.to_ldm(k): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    m = vae_map(config)
    out = {}
    for k, v in state_dict.items():
        name = m.to_ldm(k)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out[VAE_PREFIX + name] = v
    return out


def clip_l_to_ldm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI CLIP text encoder (SD1.x) into `cond_stage_model.transformer.text_model.*`."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else "text_model." + k  # transformers 5 flattened it
        out[CLIP_L_PREFIX + name] = v
    return out
