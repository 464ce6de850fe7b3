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
CLIP_L_PREFIX = "cond_stage_model.transformer."  # SD1.x; SDXL's first encoder: "conditioner.embedders.0.transformer."
OPEN_CLIP_SD2_PREFIX = "cond_stage_model.model."
OPEN_CLIP_SDXL_PREFIX = "conditioner.embedders.1.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."

# HF CLIP layer attribute -> OpenCLIP resblock attribute
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}

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


def clip_l_to_ldm(state_dict: Mapping[str, Any], prefix: str = CLIP_L_PREFIX) -> dict[str, Any]:
    """OpenAI CLIP text encoder (SD1.x, SDXL's first) into `<prefix>text_model.*`."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else "text_model." + k  # transformers 5 flattened it
        out[prefix + name] = v
    return out


def open_clip_to_ldm(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An HF CLIP text encoder into the OpenCLIP layout SD2 (`cond_stage_model.model.`) and SDXL's
    second encoder (`conditioner.embedders.1.model.`) store: q/k/v fused into `attn.in_proj_*`
    (in that order) and `text_projection` as [width, proj], the transpose of the HF Linear."""
    flat = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [flat.pop(f"{src}self_attn.{p}_proj.{part}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{part}"] = _cat(qkv)
        for hf, oc in _OPEN_CLIP_LAYER.items():
            for part in ("weight", "bias"):
                out[f"{dst}{oc}.{part}"] = flat.pop(f"{src}{hf}.{part}")
    out[prefix + "token_embedding.weight"] = flat.pop("embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = flat.pop("embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = flat.pop("final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = flat.pop("final_layer_norm.bias")
    if "text_projection.weight" in flat:
        out[prefix + "text_projection"] = flat.pop("text_projection.weight").T.contiguous()
    if flat:
        raise KeyError(f"no OpenCLIP name for {sorted(flat)[:3]}")
    return out


def open_clip_weight_name(hf_module: str, prefix: str) -> tuple[str, int | None]:
    """The OpenCLIP checkpoint weight that holds an HF CLIP text-encoder module's weight, and which
    third of the fused `attn.in_proj_weight` it is (0, 1, 2 for q, k, v; None when not fused)."""
    name = hf_module.removeprefix("text_model.")
    parts = name.split(".")
    if parts[:2] != ["encoder", "layers"] or len(parts) < 4:
        raise KeyError(hf_module)
    dst, rest = f"{prefix}transformer.resblocks.{parts[2]}.", ".".join(parts[3:])
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if rest in qkv:
        return dst + "attn.in_proj_weight", qkv[rest]
    if rest in _OPEN_CLIP_LAYER:
        return dst + _OPEN_CLIP_LAYER[rest] + ".weight", None
    raise KeyError(hf_module)


def _cat(tensors):
    import torch

    return torch.cat(list(tensors), dim=0)
