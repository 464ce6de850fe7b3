"""DoRA in the layout A1111 and ComfyUI apply: one magnitude per INPUT column.

A1111 (networks `apply_weight_decompose`) computes W' = (W + dW) * dora_scale / ||W + dW||, the norm
taken over the output axis for each input column, and only that way; ComfyUI reads the same when
`dora_scale` is [1, in, ...] (it switches to per-output norms only when dora_scale's first dimension
equals the weight's). PEFT's DoRA keeps a per-OUTPUT magnitude, which A1111 would mis-apply, so DoRA
here is our own: PEFT supplies the LoRA A/B layers and this module replaces their forward with
the decomposed weight and adds the magnitude `dora_scale` ([1, in] for Linear, [1, in, 1, 1] for
Conv2d), exported under kohya's `<module>.dora_scale` key. As in the DoRA paper the norm is not
differentiated through (it is detached), and LoRA dropout does not apply to a merged weight.
"""

from __future__ import annotations

import types

MAGNITUDE = "dora_scale"


def column_norm(weight):
    """||W|| per input column: [1, in] for a Linear weight, [1, in, 1, 1] for a Conv2d weight."""
    flat = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return flat.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def _delta(layer):
    up = layer.lora_B["default"].weight
    down = layer.lora_A["default"].weight
    weight = layer.base_layer.weight
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * layer.scaling["default"]


def decomposed_weight(layer):
    import torch

    # in fp32 whatever the base's storage type: the magnitude and the LoRA weights are fp32, and a
    # bf16 sum would round away most of the small LoRA delta
    weight = layer.base_layer.weight.float()
    merged = weight + _delta(layer).float()
    full = merged * (getattr(layer, MAGNITUDE) / column_norm(merged).detach())
    strength = layer.dora_strength
    return full if strength == 1.0 else torch.lerp(weight, full, strength)


def _forward(self, x, *args, **kwargs):
    import torch.nn.functional as F

    base = self.base_layer
    if self.disable_adapters or self.dora_strength == 0.0:
        return base(x, *args, **kwargs)
    weight = decomposed_weight(self).to(x.dtype)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)


def add_dora(model) -> list:
    """Turn every PEFT LoRA layer of `model` into a DoRA layer; returns the magnitude parameters."""
    import torch

    params = []
    for _, module in model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        weight = module.base_layer.weight
        with torch.no_grad():
            magnitude = torch.nn.Parameter(column_norm(weight.float()).clone())
        module.register_parameter(MAGNITUDE, magnitude)
        module.dora_strength = 1.0
        module.forward = types.MethodType(_forward, module)
        params.append(magnitude)
    return params


def is_dora(module) -> bool:
    return isinstance(getattr(module, MAGNITUDE, None), __import__("torch").nn.Parameter)
