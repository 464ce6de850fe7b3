"""Block control for the UNet: which block each LoRA target belongs to, per-block learning-rate weights
and per-block ranks (kohya's `down_lr_weight` / `mid_lr_weight` / `up_lr_weight` and `block_dims` ideas).

Blocks are numbered as in the LDM layout the hosts use: `in0`..`inN-1` (input_blocks), `mid`
(middle_block), `out0`..`outN-1` (output_blocks); N = 12 for SD1.x/SD2.x, 9 for SDXL. kohya's lists
follow the same order: `down_lr_weight` has N values (in0..), `up_lr_weight` N (out0..), and
`block_dims` / `block_alphas` 2N + 1 (in.., mid, out..). in0 holds only conv_in, which kohya never
targets. A list may also be one of kohya's shapes: `cosine`, `sine`, `linear`, `reverse_linear`,
`zeros`, optionally `+offset` (e.g. `sine+0.5`). A weight of 0 leaves the block untrained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from shared.errors import ConfigError
from shared.sd.ldm_layout import unet_map

_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.|^middle_block\.")


def blocks_per_side(unet_config: Mapping) -> int:
    """N: input (and output) blocks of the layout, conv_in's included."""
    return len(unet_config["down_block_types"]) * (int(unet_config["layers_per_block"]) + 1)


def block_names(unet_config: Mapping) -> list[str]:
    n = blocks_per_side(unet_config)
    return [f"in{i}" for i in range(n)] + ["mid"] + [f"out{i}" for i in range(n)]


def block_of(module: str, unet_config: Mapping, _map=None) -> str:
    """The block of a diffusers UNet module name (or an LDM one)."""
    ldm = module if _LDM_BLOCK.match(module) else (_map or unet_map(dict(unet_config))).to_ldm(module)
    m = _LDM_BLOCK.match(ldm)
    if not m:
        raise KeyError(f"{module}: not inside an input, middle or output block")
    if m.group(1) is None:
        return "mid"
    return ("in" if m.group(1) == "input_blocks" else "out") + m.group(2)


def module_blocks(modules: list[str], unet_config: Mapping) -> dict[str, str]:
    """{module name: block} for UNet module names (kohya's targets, LoCon's convs)."""
    mapping = unet_map(dict(unet_config))
    return {name: block_of(name, unet_config, mapping) for name in modules}


def parse_weights(value, count: int, key: str) -> list[float]:
    """A list of `count` numbers from a list, a comma-separated string or one of kohya's shapes."""
    if isinstance(value, str):
        name, _, offset = value.strip().partition("+")
        shapes = ("cosine", "sine", "linear", "reverse_linear", "zeros")
        if name in shapes:
            try:
                base = float(offset) if offset else 0.0
            except ValueError:
                raise ConfigError(f"{key}: {value!r}: the part after '+' must be a number") from None
            steps = [i / (count - 1) for i in range(count)] if count > 1 else [0.0]
            curve = {"sine": [math.sin(math.pi / 2 * s) for s in steps],
                     "cosine": [math.sin(math.pi / 2 * s) for s in reversed(steps)],
                     "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * count}[name]
            return [c + base for c in curve]
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {count} numbers or one of cosine, sine, linear, reverse_linear, zeros")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected numbers, got {value!r}") from None
    if len(numbers) != count:
        raise ConfigError(f"{key}: expected {count} values (one per block), got {len(numbers)}")
    if any(n < 0 for n in numbers):
        raise ConfigError(f"{key}: weights may not be negative, got {value!r}")
    return numbers


def block_lr_weights(unet_config: Mapping, *, down=None, mid=None, up=None) -> dict[str, float]:
    """{block: lr weight} from kohya's three keys (each None: weight 1 for that part)."""
    n = blocks_per_side(unet_config)
    weights = {name: 1.0 for name in block_names(unet_config)}
    if down is not None:
        weights.update(zip((f"in{i}" for i in range(n)), parse_weights(down, n, "down_lr_weight")))
    if mid is not None:
        weights["mid"] = parse_weights([mid] if isinstance(mid, (int, float)) else mid, 1, "mid_lr_weight")[0]
    if up is not None:
        weights.update(zip((f"out{i}" for i in range(n)), parse_weights(up, n, "up_lr_weight")))
    return weights


def block_module_ranks(modules: dict[str, str], unet_config: Mapping, dims, alphas=None,
                       key: str = "block_dims") -> dict[str, tuple[int, float]]:
    """{module: (rank, alpha)} from `block_dims` (2N + 1 ranks, in.., mid, out..) and `block_alphas`
    (default: each block's rank). Rank 0 leaves the block's modules out."""
    names = block_names(unet_config)
    ranks = [int(r) for r in parse_weights(dims, len(names), key)]
    alpha_key = key.replace("dims", "alphas")
    alpha_list = parse_weights(alphas, len(names), alpha_key) if alphas is not None else [float(r) for r in ranks]
    per_block = dict(zip(names, zip(ranks, alpha_list)))
    return {module: per_block[block] for module, block in modules.items()}


def adapter_params_by_module(model) -> dict[str, list]:
    """{module name: its adapter parameters} for PEFT LoRA/DoRA layers and LyCORIS modules on `model`."""
    from shared.sd.lycoris import lycoris_network

    out: dict[str, list] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            params = [module.lora_A["default"].weight, module.lora_B["default"].weight]
            if isinstance(getattr(module, "dora_scale", None), __import__("torch").nn.Parameter):
                params.append(module.dora_scale)
            out[name] = params
    network = lycoris_network(model)
    for lyco in getattr(network, "loras", []) if network is not None else []:
        out.setdefault(names[id(lyco.org_module[0])], []).extend(lyco.parameters())
    return out


def block_param_groups(unet, lr: float, weights: Mapping[str, float]) -> list[dict]:
    """Optimizer parameter groups, one per block, `lr * weight` each. A block with weight 0 is frozen
    and left out of the groups (kohya leaves it untrained too)."""
    by_module = adapter_params_by_module(unet)
    blocks = module_blocks(list(by_module), unet.config)
    groups: dict[str, list] = {}
    for module, params in by_module.items():
        groups.setdefault(blocks[module], []).extend(params)
    out = []
    for block in block_names(unet.config):
        params = groups.get(block)
        if not params:
            continue
        weight = float(weights.get(block, 1.0))
        if weight == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        out.append({"params": params, "lr": lr * weight, "block": block})
    return out


def configured_module_ranks(cfg, unet, targets: list[str], conv_targets: list[str]) -> dict[str, tuple[int, float]] | None:
    """(rank, alpha) per UNet target from `block_dims` / `block_alphas` (the Linear and 1x1 layers) and
    `conv_block_dims` / `conv_block_alphas` (LoCon's 3x3 convs); None when neither is set."""
    import torch

    if cfg.block_dims is None and cfg.conv_block_dims is None:
        return None
    modules = dict(unet.named_modules())
    convs = [t for t in conv_targets if isinstance(modules[t], torch.nn.Conv2d)
             and tuple(modules[t].kernel_size) != (1, 1)]
    others = [t for t in dict.fromkeys([*targets, *conv_targets]) if t not in convs]
    ranks: dict[str, tuple[int, float]] = {}
    if cfg.block_dims is not None:
        ranks.update(block_module_ranks(module_blocks(others, unet.config), unet.config, cfg.block_dims,
                                        cfg.block_alphas))
    if cfg.conv_block_dims is not None:
        ranks.update(block_module_ranks(module_blocks(convs, unet.config), unet.config, cfg.conv_block_dims,
                                        cfg.conv_block_alphas, key="conv_block_dims"))
    return ranks


def configured_lr_weights(cfg, unet_config: Mapping) -> dict[str, float] | None:
    """{block: lr factor} from `down_lr_weight` / `mid_lr_weight` / `up_lr_weight`; None when none is set."""
    if cfg.down_lr_weight is None and cfg.mid_lr_weight is None and cfg.up_lr_weight is None:
        return None
    return block_lr_weights(unet_config, down=cfg.down_lr_weight, mid=cfg.mid_lr_weight, up=cfg.up_lr_weight)


def block_network_args(cfg) -> dict[str, str]:
    """The block settings as kohya records them in `ss_network_args` (comma-separated values)."""
    out = {}
    for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
                "conv_block_alphas"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
    return out
