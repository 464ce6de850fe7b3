"""LoRA dropout that costs less on the CPU.

peft applies `lora_dropout` to the input of every LoRA layer: with 7 adapted layers a block that is 7
full-size masks a step. On the CPU torch draws a dropout mask with `bernoulli_`, one generator call per
element (about 10 ns an element on one core here), and applying a bool mask (`masked_fill`, `where`,
or a multiply by a bool tensor) converts it element by element, about 1 ns each. `FastDropout` draws
16 random bits per element instead (one full 64-bit draw gives four elements) and keeps an element
when its bits are at or above p x 65536: the same Bernoulli(1 - p) keep rule to 1/65536, the same
1 / (1 - p) scale, from the same global generator (so a resumed run draws the masks an unbroken one
does). The mask is applied and saved for the backward pass as one byte per element of 0/1 (`uint8`:
a multiply by it vectorises, about 4x a bool mask's), so it holds what nn.Dropout's own mask holds.
Forward and backward together, a 480 x 512 bf16 input on one core here: 0.7-1.0 ms against 1.7 ms for
the previous three-elements-a-draw `masked_fill` version; in 8 steps of the 53 M LLM benchmark the
step time fell from 9.55 to 7.93 s (profiled). On accelerators torch's own fused dropout is already cheap and is what runs.
"""

from __future__ import annotations

import torch
from torch import nn

_INT64_MIN = -(2**63)  # random_(_INT64_MIN, None) fills an int64 with 64 uniform bits: four uniform int16 fields


class FastDropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU (see the module docstring)."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        fields = torch.empty((n + 3) // 4, dtype=torch.int64).random_(_INT64_MIN, None).view(torch.int16)
        # each field is uniform on [-32768, 32767]: keep when it is at or above the p-quantile
        keep = (fields[:n] >= round(self.p * 65536) - 32768).view(torch.uint8).view(x.shape)
        # autograd keeps only `keep` for this product (x * scale is not needed to differentiate it)
        return x.mul(1.0 / (1.0 - self.p)).mul(keep)


def use_fast_dropout(model) -> int:
    """Swap peft's LoRA dropout modules for `FastDropout` with the same p; returns how many."""
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, nn.ModuleDict):
            continue
        for name, layer in table.items():
            if type(layer) is nn.Dropout and layer.p > 0:
                table[name] = FastDropout(layer.p)
                swapped += 1
    return swapped
