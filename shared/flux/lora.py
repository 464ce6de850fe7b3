"""Which Flux modules get LoRA, and LoRA trained on the fused projections the hosts apply it to.

Targets are chosen the way kohya's Flux LoRA names them: by the Black Forest Labs modules of the
double blocks (img_attn = qkv + proj, img_mlp, img_mod, and their txt_* twins) and single blocks
(single = linear1 + linear2, single_mod = modulation.lin), for a choice of block indices.

Fused projections: ComfyUI and Forge apply a LoRA to the BFL file's fused weights, so a file names
`double_blocks.N.img_attn.qkv` (and `single_blocks.N.linear1` = q, k, v and the MLP input) with one
down and one up matrix. We train exactly that: the diffusers parts of one fused BFL Linear (to_q,
to_k, to_v [, proj_mlp]) share one LoRA A (down) and keep their own B (the row blocks of the fused
up), which is a rank-r LoRA on the fused weight. The file then holds rank r and the configured alpha
everywhere, is as small as kohya's, and its export is exact. Fusing separate q/k/v LoRAs instead
(kohya's experimental split_qkv) needs a block-diagonal up of rank 3r (4r for linear1) with alpha
scaled by 3 (4): the same function class per part but files 2-3 times larger.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from shared.flux.layout import BflLinear, block_linears
from shared.schema import flux as schema_flux

# kohya's layer groups (its img_attn_dim, ..., single_dim, single_mod_dim network args)
LORA_PARTS = {
    "img_attn": ("img_attn.qkv", "img_attn.proj"),
    "img_mlp": ("img_mlp.0", "img_mlp.2"),
    "img_mod": ("img_mod.lin",),
    "txt_attn": ("txt_attn.qkv", "txt_attn.proj"),
    "txt_mlp": ("txt_mlp.0", "txt_mlp.2"),
    "txt_mod": ("txt_mod.lin",),
    "single": ("linear1", "linear2"),
    "single_mod": ("modulation.lin",),
}
# The default (declared with the flux_lora_parts setting): attention and MLP of both block kinds; the
# modulation Linears are left out, as musubi-tuner and kohya's newer trainers do by default (community
# reports: better results, and they are the largest)
DEFAULT_PARTS = schema_flux.DEFAULT_PARTS
ADAPTER = "default"


def parse_blocks(spec: Any, count: int, key: str) -> list[int]:
    """Block indices from `all`, `none`, a list of ints, or text like `0,1,4-6` (kohya's syntax)."""
    if spec is None or spec == "all":
        return list(range(count))
    if spec == "none" or spec == []:
        return []
    items: list[int] = []
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    for part in parts:
        text = str(part).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not m:
            raise ValueError(f"{key}: {text!r} is not a block index or range (e.g. 0,1,4-6; all; none)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= count:
            raise ValueError(f"{key}: {text} is outside 0-{count - 1} (this model has {count} such blocks)")
        items += range(lo, hi + 1)
    return sorted(set(items))


def select_targets(config: Mapping[str, Any], parts: Iterable[str] = DEFAULT_PARTS, double_blocks: Any = "all",
                   single_blocks: Any = "all") -> list[BflLinear]:
    """The BFL Linears that get LoRA, in file order."""
    parts = list(parts)
    unknown = [p for p in parts if p not in LORA_PARTS]
    if unknown:
        raise ValueError(f"lora parts: {unknown[0]!r} is not one of {', '.join(LORA_PARTS)}")
    doubles = set(parse_blocks(double_blocks, config["num_layers"], "double_blocks"))
    singles = set(parse_blocks(single_blocks, config["num_single_layers"], "single_blocks"))
    wanted = {suffix for p in parts for suffix in LORA_PARTS[p]}
    out = []
    for linear in block_linears(config):
        kind, index, suffix = linear.name.split(".", 2)
        chosen = doubles if kind == "double_blocks" else singles
        if int(index) in chosen and suffix in wanted:
            out.append(linear)
    if not out:
        raise ValueError("no Flux modules selected for LoRA (check the parts and the block choice)")
    return out


def inject_flux_lora(transformer, targets: list[BflLinear], *, rank: int, alpha: float, dropout: float = 0.0,
                     init: str = "default", init_std: float | None = None) -> list:
    """LoRA (fp32) on the diffusers parts of every target; the parts of a fused target share their
    A. Everything else is frozen. Returns the trainable parameters (each once)."""
    import torch

    from shared.images.lora import inject_lora, is_lora_param

    parts = [p for t in targets for p in t.parts]
    inject_lora(transformer, parts, rank=rank, alpha=alpha, dropout=dropout, init=init, init_std=init_std)
    modules = dict(transformer.named_modules())
    for name in parts:
        layer = modules[name]
        layer.lora_A[ADAPTER].to(torch.float32)
        layer.lora_B[ADAPTER].to(torch.float32)
        # PEFT creates the adapter in the base weight's dtype (float8 with fp8 storage): initialise
        # again now that it is fp32
        layer.reset_lora_parameters(ADAPTER, "gaussian" if init == "gaussian" else True)
        if init == "gaussian" and init_std is not None:
            with torch.no_grad():
                layer.lora_A[ADAPTER].weight.normal_(0.0, init_std)
    for target in targets:
        if target.fused:
            shared = modules[target.parts[0]].lora_A[ADAPTER]
            for name in target.parts[1:]:
                modules[name].lora_A[ADAPTER] = shared
    return [p for n, p in transformer.named_parameters() if is_lora_param(n)]


def trained_targets(transformer) -> list[BflLinear]:
    """The BFL Linears of `transformer` that carry LoRA; a fused one only with its parts' A shared."""
    modules = dict(transformer.named_modules())
    out = []
    for linear in block_linears(dict(transformer.config)):
        layers = [modules.get(p) for p in linear.parts]
        with_lora = [getattr(m, "lora_A", None) is not None and ADAPTER in m.lora_A for m in layers]
        if not any(with_lora):
            continue
        if not all(with_lora) or any(m.lora_A[ADAPTER] is not layers[0].lora_A[ADAPTER] for m in layers):
            raise ValueError(f"{linear.name}: its parts {', '.join(linear.parts)} do not share one LoRA A; "
                             "inject LoRA with inject_flux_lora")
        out.append(linear)
    return out


def clip_l_targets(text_encoder) -> list[str]:
    """CLIP-L's attention and MLP Linears, kohya's text-encoder targets (as for SD)."""
    from shared.images.lora import kohya_text_encoder_targets

    return kohya_text_encoder_targets(text_encoder)
