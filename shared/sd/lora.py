"""Which SD modules get LoRA (kohya's default set), and putting PEFT LoRA layers on them."""

from __future__ import annotations


def kohya_unet_targets(unet) -> list[str]:
    """Every Linear and 1x1 Conv inside the UNet's Transformer2D blocks: proj_in/out, attn1/attn2
    q/k/v/out.0, ff.net.0.proj, ff.net.2. That is kohya's default, what the hosts' LoRA loaders map
    (192 modules on SD1.5)."""
    import torch.nn as nn
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    names = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for name, module in block.named_modules():
            is_linear = isinstance(module, nn.Linear)
            is_1x1 = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            if (is_linear or is_1x1) and name:
                names.append(f"{block_name}.{name}")
    return names


def inject_lora(model, targets: list[str], *, rank: int, alpha: float, dropout: float, init: str):
    """Add LoRA layers (adapter "default") to exactly the named modules; freeze everything else.
    Returns the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    if not targets:
        raise ValueError("no LoRA target modules")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian" if init == "gaussian" else True,
        # an anchored regex: exactly these modules, never one whose name merely ends the same way
        target_modules="^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$",
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name="default")
    params = []
    for name, param in model.named_parameters():
        trainable = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    return params


def lora_modules(model):
    """(module name, lora_A weight, lora_B weight) for every LoRA-wrapped module."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            yield name, lora_a["default"].weight, module.lora_B["default"].weight
