"""The device and the number types of a run: one set-up for every task.

accelerate's `Accelerator` picks the device (and joins the processes of a data-parallel run); its
`autocast` runs the forward passes in the mixed-precision type. The frozen base weights are stored
in that type on an accelerator and in fp32 on the CPU; trained weights and optimizer state stay fp32.
"""

from __future__ import annotations

from shared.training.task import Precision


def setup_precision(cfg):
    """(accelerator, Precision) for the config's `device` and `mixed_precision`."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if accelerator.device.type == "cpu":
        dtype = torch.float32
    return accelerator, Precision(device=accelerator.device, weight_dtype=dtype,
                                  mixed_precision=cfg.mixed_precision, autocast=accelerator.autocast)
