"""Which modules of an image model get LoRA (kohya's default set: the SD UNet's, CLIP's, also Flux's
CLIP-L), and putting PEFT LoRA layers on any named modules (SD and Flux alike)."""

from __future__ import annotations

import re

# kohya's module classes whose Linear / Conv children get LoRA
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoCon (conv_rank > 0)
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP", "CLIPSdpaAttention")


def _children(model, block_classes: tuple[str, ...], *, conv3x3: bool) -> list[tuple[str, object]]:
    import torch.nn as nn

    found = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for name, module in block.named_modules():
            if not name:
                continue
            is_linear = isinstance(module, nn.Linear)
            is_conv = isinstance(module, nn.Conv2d)
            is_1x1 = is_conv and tuple(module.kernel_size) == (1, 1)
            if is_linear or is_1x1 or (conv3x3 and is_conv):
                found[f"{block_name}.{name}" if block_name else name] = module
    return list(found.items())


def kohya_unet_targets(unet) -> list[str]:
    """Every Linear and 1x1 Conv inside the UNet's Transformer2D blocks: proj_in/out, attn1/attn2
    q/k/v/out.0, ff.net.0.proj, ff.net.2. That is kohya's default, what the hosts' LoRA loaders map
    (192 modules on SD1.5, 722 on SDXL)."""
    return [name for name, _ in _children(unet, UNET_ATTENTION_BLOCKS, conv3x3=False)]


def kohya_conv_targets(unet) -> list[str]:
    """LoCon's extra modules: the Linear and Conv layers of ResBlocks, down- and upsamplers."""
    return [name for name, _ in _children(unet, UNET_CONV_BLOCKS, conv3x3=True)]


def kohya_text_encoder_targets(text_encoder) -> list[str]:
    """Every Linear of the CLIP attention and MLP blocks: q/k/v/out_proj, fc1, fc2 (72 modules in
    SD1.5's encoder, 264 over SDXL's two)."""
    return [name for name, _ in _children(text_encoder, TEXT_ENCODER_BLOCKS, conv3x3=False)]


def inject_lora(model, targets: list[str], *, rank: int, alpha: float, dropout: float, init: str,
                init_std: float | None = None, conv_targets: list[str] = (), conv_rank: int = 0,
                conv_alpha: float | None = None, dora: bool = False,
                module_ranks: dict[str, tuple[int, float]] | None = None):
    """Add LoRA layers (adapter "default") to exactly the named modules; freeze everything else.
    3x3 convs among `conv_targets` get `conv_rank`/`conv_alpha`; `module_ranks` sets (rank, alpha) per
    module name (block_dims; rank 0 leaves the module out). Returns the trainable parameters."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    all_targets = list(targets) + [t for t in conv_targets if t not in targets]
    module_ranks = module_ranks or {}
    all_targets = [t for t in all_targets if module_ranks.get(t, (1, 1))[0] > 0]
    if not all_targets:
        raise ValueError("no LoRA target modules")
    modules = dict(model.named_modules())
    rank_pattern, alpha_pattern = {}, {}
    for name in conv_targets:
        module = modules[name]
        if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
            rank_pattern[re.escape(name)] = conv_rank
            alpha_pattern[re.escape(name)] = conv_alpha or conv_rank
    for name, (module_rank, module_alpha) in module_ranks.items():
        if name in all_targets:
            rank_pattern[re.escape(name)] = module_rank
            alpha_pattern[re.escape(name)] = module_alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian" if init == "gaussian" else True,
        # an anchored regex: exactly these modules, never one whose name merely ends the same way
        target_modules="^(" + "|".join(re.escape(t) for t in all_targets) + ")$",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name="default")
    params = []
    for name, param in model.named_parameters():
        trainable = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    if init == "gaussian" and init_std is not None:
        with torch.no_grad():
            for _, lora_a, _, _ in lora_modules(model):
                lora_a.normal_(0.0, init_std)
    if dora:
        from shared.images.dora import add_dora

        params += add_dora(model)
    return params


def lora_modules(model):
    """(module name, lora_A weight, lora_B weight, alpha) for every LoRA-wrapped module."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            yield name, lora_a["default"].weight, module.lora_B["default"].weight, module.lora_alpha["default"]


def is_lora_param(name: str) -> bool:
    """A trained adapter tensor: PEFT LoRA, our DoRA magnitude, or a LyCORIS module's (the network is the
    model's `lycoris` submodule, shared/sd/lycoris.py)."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".dora_scale") or name.startswith("lycoris.")


def lora_state(model) -> dict:
    """The trainable LoRA (and DoRA magnitude) tensors by parameter name (what a training state saves)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_lora_param(n)}
