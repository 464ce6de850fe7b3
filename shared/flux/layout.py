"""Names of the Black Forest Labs (BFL) Flux transformer file, from diffusers names, in both directions.

The BFL file (`flux1-dev.safetensors`, what ComfyUI, Forge and kohya load) fuses what diffusers keeps
apart: a double block's `img_attn.qkv` is diffusers' `to_q`, `to_k`, `to_v` stacked by rows (and
`txt_attn.qkv` the `add_*_proj` twins); a single block's `linear1` is q, k, v and `proj_mlp` stacked;
`final_layer.adaLN_modulation.1` holds (shift, scale) where diffusers' `norm_out.linear` holds
(scale, shift). diffusers' own reader (`convert_flux_transformer_checkpoint_to_diffusers`) assumes the
full 3072 width when it splits `linear1`, so any other width fails there; here every split size comes
from the config, which `infer_config` reads from the file's own tensor shapes. The same table names
LoRA modules the way the hosts expect (`lora_unet_double_blocks_0_img_attn_qkv`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MARKER_KEYS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight")
GUIDANCE_MARKER = "guidance_in.in_layer.weight"  # only FLUX.1-dev (guidance-distilled) has it
ROPE_AXES_128 = (16, 56, 56)  # the published models' rotary axes for 128-wide heads


@dataclass(frozen=True)
class BflLinear:
    """One Linear of the BFL file and the diffusers Linears whose outputs it stacks (in row order)."""

    name: str
    parts: tuple[str, ...]
    swap_halves: bool = False  # final_layer: (shift, scale) vs diffusers' (scale, shift)

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def _double(i: int) -> list[BflLinear]:
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    return [
        BflLinear(b + "img_mod.lin", (d + "norm1.linear",)),
        BflLinear(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
        BflLinear(b + "img_attn.proj", (d + "attn.to_out.0",)),
        BflLinear(b + "img_mlp.0", (d + "ff.net.0.proj",)),
        BflLinear(b + "img_mlp.2", (d + "ff.net.2",)),
        BflLinear(b + "txt_mod.lin", (d + "norm1_context.linear",)),
        BflLinear(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
        BflLinear(b + "txt_attn.proj", (d + "attn.to_add_out",)),
        BflLinear(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
        BflLinear(b + "txt_mlp.2", (d + "ff_context.net.2",)),
    ]


def _single(i: int) -> list[BflLinear]:
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    return [
        BflLinear(b + "modulation.lin", (d + "norm.linear",)),
        BflLinear(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
        BflLinear(b + "linear2", (d + "proj_out",)),
    ]


def block_linears(config: Mapping[str, Any]) -> list[BflLinear]:
    """The Linears inside the double and single blocks (what LoRA trains), in file order."""
    out: list[BflLinear] = []
    for i in range(config["num_layers"]):
        out += _double(i)
    for i in range(config["num_single_layers"]):
        out += _single(i)
    return out


def all_linears(config: Mapping[str, Any]) -> list[BflLinear]:
    out = [
        BflLinear("img_in", ("x_embedder",)),
        BflLinear("txt_in", ("context_embedder",)),
        BflLinear("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        BflLinear("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        BflLinear("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        BflLinear("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ]
    if config.get("guidance_embeds"):
        out += [
            BflLinear("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            BflLinear("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    out += block_linears(config)
    out += [
        BflLinear("final_layer.linear", ("proj_out",)),
        BflLinear("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    return out


def norm_renames(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers name -> BFL name of the q/k RMSNorm scales (the only weights that are not Linears)."""
    out = {}
    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out[d + "norm_q.weight"] = b + "img_attn.norm.query_norm.scale"
        out[d + "norm_k.weight"] = b + "img_attn.norm.key_norm.scale"
        out[d + "norm_added_q.weight"] = b + "txt_attn.norm.query_norm.scale"
        out[d + "norm_added_k.weight"] = b + "txt_attn.norm.key_norm.scale"
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[d + "norm_q.weight"] = b + "norm.query_norm.scale"
        out[d + "norm_k.weight"] = b + "norm.key_norm.scale"
    return out


def part_rows(linear: BflLinear, config: Mapping[str, Any]) -> list[int]:
    """Output rows of each diffusers part of a fused Linear: q, k, v are `inner` wide, the MLP 4x."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return [4 * inner if part.endswith("proj_mlp") else inner for part in linear.parts]


def _swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel state dict under BFL names (what the fixtures write)."""
    import torch

    sd = dict(state_dict)
    out = {}
    for linear in all_linears(config):
        for kind in ("weight", "bias"):
            tensors = [sd.pop(f"{part}.{kind}") for part in linear.parts]
            tensor = torch.cat(tensors, dim=0) if linear.fused else tensors[0]
            out[f"{linear.name}.{kind}"] = _swap_halves(tensor) if linear.swap_halves else tensor
    for diffusers_name, bfl_name in norm_renames(config).items():
        out[bfl_name] = sd.pop(diffusers_name)
    if sd:
        raise KeyError(f"no BFL name for {sorted(sd)[:3]}")
    return out


def bfl_to_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(diffusers state dict, BFL keys left over) for a BFL transformer state dict. A missing key
    raises KeyError naming it; the caller reports leftovers and shape mismatches."""
    sd = dict(state_dict)
    out = {}
    for linear in all_linears(config):
        for kind in ("weight", "bias"):
            key = f"{linear.name}.{kind}"
            if key not in sd:
                raise KeyError(key)
            tensor = sd.pop(key)
            if linear.swap_halves:
                tensor = _swap_halves(tensor)
            if not linear.fused:
                out[f"{linear.parts[0]}.{kind}"] = tensor
                continue
            rows = part_rows(linear, config)
            if tensor.shape[0] != sum(rows):
                raise ValueError(f"{key}: {tuple(tensor.shape)} rows, the config gives {sum(rows)}")
            for part, piece in zip(linear.parts, tensor.split(rows, dim=0)):
                out[f"{part}.{kind}"] = piece
    for diffusers_name, bfl_name in norm_renames(config).items():
        if bfl_name not in sd:
            raise KeyError(bfl_name)
        out[diffusers_name] = sd.pop(bfl_name)
    return out, sorted(sd)


def _count(state_dict: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary axes: the published (16, 56, 56) for 128-wide heads, the same proportions else.
    The file holds no weights for them, so a size they do not fit needs a model_config."""
    if head_dim == 128:
        return ROPE_AXES_128
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(f"attention head width {head_dim} has no standard rotary split; give a model_config")
    return axes


def infer_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel config read from a BFL state dict's tensor shapes."""
    inner, in_channels = state_dict["img_in.weight"].shape
    head_dim = state_dict["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0] if (
        "double_blocks.0.img_attn.norm.query_norm.scale" in state_dict
    ) else state_dict["single_blocks.0.norm.query_norm.scale"].shape[0]
    if inner % head_dim:
        raise ValueError(f"width {inner} is not a multiple of the head width {head_dim}")
    mlp = None
    if "double_blocks.0.img_mlp.0.weight" in state_dict:
        mlp = state_dict["double_blocks.0.img_mlp.0.weight"].shape[0]
    elif "single_blocks.0.linear2.weight" in state_dict:
        mlp = state_dict["single_blocks.0.linear2.weight"].shape[1] - inner
    if mlp is not None and mlp != 4 * inner:
        raise ValueError(f"MLP width {mlp} is not 4 x {inner}: diffusers' Flux blocks cannot hold it")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(state_dict["final_layer.linear.weight"].shape[0]),
        "num_layers": _count(state_dict, "double_blocks."),
        "num_single_layers": _count(state_dict, "single_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(state_dict["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(state_dict["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": GUIDANCE_MARKER in state_dict,
        "axes_dims_rope": list(rope_axes(int(head_dim))),
    }


def lora_name(bfl_module: str) -> str:
    """The kohya key ComfyUI and Forge map onto a BFL module: `lora_unet_` + dots as underscores."""
    return "lora_unet_" + bfl_module.replace(".", "_")
