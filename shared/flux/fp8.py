"""Base weights stored in float8_e4m3fn and computed in the activations' dtype (bf16 on a GPU).

A frozen Linear keeps its weight as float8 (1 byte per value instead of 2) and casts it up for each
matmul, which is what kohya's `--fp8_base` does and how ComfyUI runs the published fp8 files. We keep
the plain e4m3 cast rather than a scaled format (torchao's Float8WeightOnly, optimum-quanto's
qfloat8; both run on this CPU): an fp8 file loads bit for bit as it was written, PEFT wraps the module
as the nn.Linear it still is, and block swap moves it like any other weight. Norms, biases and the
LoRA weights stay in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


class _Fp8Matmul(torch.autograd.Function):
    """x @ W.T with W upcast from fp8 for the matmul only. Plain F.linear would keep the upcast copy
    for its backward, so every Linear of a step would hold a bf16 weight until the backward (all the
    memory fp8 saves, and more); here the backward upcasts the fp8 weight again."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Fp8Linear(torch.nn.Linear):
    """An nn.Linear whose frozen weight is float8_e4m3fn; the forward casts it to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _Fp8Matmul.apply(x, self.weight, self.bias)


def _is_lora_part(name: str) -> bool:
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in name.split("."))


def store_in_fp8(model: torch.nn.Module, *, prefixes: tuple[str, ...] = ("transformer_blocks.",
                                                                          "single_transformer_blocks.")) -> int:
    """Cast the weight of every frozen Linear under `prefixes` (by default the double and single
    blocks, where nearly all of Flux's weights are) to float8_e4m3fn, in place; return how many.
    LoRA layers are left as they are, so this works after LoRA injection; shared.flux.lora's
    injection also works after it (it re-creates the adapter in fp32)."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _is_lora_part(name):
            continue
        if prefixes and not name.startswith(prefixes):
            continue
        with torch.no_grad():  # a stored-in-fp8 weight is frozen (LoRA trains beside it)
            module.weight = torch.nn.Parameter(module.weight.data.to(FP8), requires_grad=False)
        module.__class__ = Fp8Linear
        count += 1
    return count


def adopt_fp8_linears(model: torch.nn.Module) -> int:
    """Make every nn.Linear whose weight already is float8 (loaded from an fp8 file) an Fp8Linear."""
    count = 0
    for _, module in model.named_modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == FP8:
            module.__class__ = Fp8Linear
            count += 1
    return count


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
