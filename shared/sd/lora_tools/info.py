"""`lora info`: what a LoRA file is: type, rank, alpha, targets, base model, metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from shared.sd.lora_file import network_args, network_dims, read_lora

# Header values too long to print whole in the text form (the JSON form has them all)
_LONG = 160


def _component(key: str) -> str:
    for prefix, name in (("lora_unet_", "unet"), ("lora_te2_", "text encoder 2"), ("lora_te1_", "text encoder 1"),
                         ("lora_te_", "text encoder")):
        if key.startswith(prefix):
            return name
    return "other"


def lora_info(path: Path) -> dict:
    """A JSON-able description of the LoRA file at `path`."""
    lora = read_lora(path)
    meta = lora.metadata
    info: dict = {"file": str(lora.path), "layout": lora.layout, "size_bytes": lora.path.stat().st_size}
    if lora.layout == "diffusers":
        modules = Counter(k.split(".", 1)[0] for k in lora.tensors if ".lora_A." in k)
        info.update(type="LoRA (diffusers/PEFT naming)", modules=sum(modules.values()), targets=dict(modules))
        try:
            info["lora_config"] = json.loads(meta.get("lora_adapter_metadata", "") or "{}")
        except ValueError:
            info["lora_config"] = {}
        info["metadata"] = meta
        return info
    rank, alpha = network_dims(lora)
    ranks = Counter(m.rank for m in lora.modules.values() if m.rank)
    alphas = Counter(m.alpha for m in lora.modules.values() if m.alpha is not None)
    targets = Counter(_component(k) for k in lora.modules)
    info.update(
        type=lora.lora_type(),
        kinds=dict(lora.kinds),
        modules=len(lora.modules),
        targets=dict(targets),
        rank=rank,
        alpha=alpha,
        ranks={str(k): v for k, v in sorted(ranks.items())},
        alphas={str(k): v for k, v in sorted(alphas.items())},
        base={
            "family": lora.arch(),
            "ss_base_model_version": meta.get("ss_base_model_version"),
            "modelspec.architecture": meta.get("modelspec.architecture"),
            "ss_sd_model_name": meta.get("ss_sd_model_name"),
            "ss_sd_model_hash": meta.get("ss_sd_model_hash"),
        },
        network_module=meta.get("ss_network_module"),
        network_args=network_args(lora),
        alias=meta.get("ss_output_name") or lora.path.stem,
        metadata=meta,
    )
    return info


def info_text(info: dict) -> str:
    """The description as lines a person reads."""
    lines = [f"{info['file']}", f"  type: {info['type']} ({info['layout']} layout), {info['modules']} modules"]
    if info["layout"] == "kohya":
        ranks = info["ranks"]
        rank_text = str(info["rank"]) if len(ranks) <= 1 else f"{info['rank']} (mixed: {ranks})"
        lines.append(f"  rank: {rank_text}   alpha: {info['alpha']}" + (f" (mixed: {info['alphas']})"
                                                                      if len(info["alphas"]) > 1 else ""))
        lines.append("  targets: " + ", ".join(f"{k} {v}" for k, v in info["targets"].items()))
        base = info["base"]
        lines.append(f"  base: {base['family']} ({base['ss_base_model_version'] or 'not stated'})"
                     + (f", trained on {base['ss_sd_model_name']}" if base["ss_sd_model_name"] else ""))
        lines.append(f"  network: {info['network_module'] or 'not stated'} {json.dumps(info['network_args'])}")
        lines.append(f"  alias: <lora:{info['alias']}:1>")
    else:
        lines.append("  targets: " + ", ".join(f"{k} {v}" for k, v in info["targets"].items()))
    if info["metadata"]:
        lines.append("  metadata:")
        for key in sorted(info["metadata"]):
            value = str(info["metadata"][key]).replace("\n", " ")
            lines.append(f"    {key}: {value if len(value) <= _LONG else value[:_LONG] + '...'}")
    return "\n".join(lines)
