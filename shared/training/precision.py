"""The device and the number types of a run: one set-up for every task and every device.

`mixed_precision: auto` (the default) picks what the device computes fastest without losing the
training: bf16 on a CUDA card with bf16 (and on XPU), fp16 with accelerate's gradient scaler on an
older card, bf16 on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX: there a bf16 matmul runs
about 2.5x an fp32 one), fp32 elsewhere (MPS, older CPUs).

The frozen base weights are *stored* in the compute type on every device, the CPU included, so a
step makes no per-step cast copies of them (autocast over fp32 weights re-casts every weight every
step, and holds both copies); the trained weights and the optimizer state stay fp32, and a task keeps
a component in fp32 where its config asks (the SDXL VAE's `force_upcast`). accelerate's `Accelerator`
picks the device, joins the processes of a data-parallel run and gives the `autocast` the forward
passes run in.
"""

from __future__ import annotations

import functools
from pathlib import Path

from shared.training.task import Precision


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (Linux: AVX512-BF16 or AMX in /proc/cpuinfo).

    Elsewhere torch would emulate bf16 through fp32, slower than fp32 itself, so the answer is no."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(requested: str, device) -> str:
    """`no`, `fp16` or `bf16`: the config's own choice, or for `auto` the fastest type `device` (a
    torch.device or its type) trains in (see the module docstring)."""
    if requested != "auto":
        return requested
    kind = getattr(device, "type", str(device)).split(":")[0]
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "xpu":
        return "bf16"
    if kind == "cpu":
        return "bf16" if cpu_has_bf16() else "no"
    return "no"


def launch_device(cfg) -> str:
    """The device type a run of `cfg` trains on, before accelerate is set up (for `accelerate launch`)."""
    if cfg.device not in ("auto", None):
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_precision(cfg):
    """(accelerator, Precision) for the config's `device` and `mixed_precision` (`auto` resolved:
    `Precision.mixed_precision` is always `no`, `fp16` or `bf16`)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # resolved before accelerate starts: it takes only a concrete type (each process of a launched run
    # resolves `auto` on the same device type, so they agree)
    mixed = resolve_mixed_precision(cfg.mixed_precision, launch_device(cfg))
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # accelerate keeps one precision per process; a later run in this process (the tests, a script
        # training twice) may pick another one: its state is per run here, the process group is kept
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.device == "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    return accelerator, Precision(device=accelerator.device, weight_dtype=dtype, mixed_precision=mixed,
                                  autocast=accelerator.autocast)
