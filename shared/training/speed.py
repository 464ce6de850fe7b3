"""The speed levers the loop applies for every task: `auto` settings resolved, and `compile`.

`auto` is resolved once, here, after the device is known and before the memory planner and the task
see the config, so every later reader (the task, the planner, the file's metadata, the resume
fingerprint) sees the value that was used: mixed precision (shared/training/precision.py) and the
image caches (`cache_plan` beside their settings in shared/schema/images.py) and the UNet's memory
format (`channels_last_choice`). Each resolution is
logged with its reason.
"""

from __future__ import annotations

import dataclasses

from shared.training.task import Precision


def resolve_auto(cfg, task: str, precision: Precision) -> tuple[object, list[str]]:
    """(the config with every `auto` speed setting replaced by its value for this device and job,
    one log line per resolved setting)."""
    from shared import schema
    from shared.schema.images import cache_plan

    changes, notes = {}, []
    if cfg.mixed_precision != precision.mixed_precision:
        changes["mixed_precision"] = precision.mixed_precision
        what = {"bf16": "bf16 (base weights stored in bf16)", "fp16": "fp16 (with a gradient scaler)",
                "no": "fp32"}[precision.mixed_precision]
        notes.append(f"mixed_precision auto: {what} on {precision.device}")
    elif cfg.mixed_precision == "fp16" and precision.device.type == "cpu":
        # accelerate gives the CPU no gradient scaler, and fp16's range underflows small gradients there;
        # the 8 GB presets set fp16 for cards, so a CPU job is told what fits it instead
        notes.append("mixed_precision fp16 on cpu: the base is stored in fp16 and the CPU has no gradient "
                     "scaler; set mixed_precision: auto (bf16 where the CPU has it, else fp32)")
    applies = {s.name for s in schema.for_task(task)}
    if "channels_last" in applies and cfg.channels_last == "auto":
        value, reason = channels_last_choice(precision)
        changes["channels_last"] = value
        notes.append(f"channels_last auto: {value} ({reason})")
    values = {name: getattr(cfg, name) for name in schema.TRAIN}
    for key, (value, reason) in cache_plan(values).items():
        if key in applies:
            changes[key] = value
            notes.append(f"{key} auto: {value} ({reason})")
    return dataclasses.replace(cfg, **changes), notes


def channels_last_choice(precision: Precision) -> tuple[str, str]:
    """What `channels_last: auto` becomes on this device, and why. On this project's AVX512-BF16 CPU,
    oneDNN's bf16 convolutions run natively on NHWC: SD1.5 at 256 px took 0.93x the time per step
    (docs/benchmarks.md). On CUDA the gain depends on the card and cuDNN; it stays off until
    benchmarks/gpu has measured it."""
    if precision.device.type == "cpu" and precision.mixed_precision == "bf16":
        return "yes", "bf16 convolutions on this CPU run faster on NHWC tensors"
    return "no", f"not measured to pay under {precision.mixed_precision} on {precision.device.type}"


def compile_modules(modules: list) -> None:
    """`compile: true`: compile the trained modules in place, so their parameter names (and the saved
    states and adapters) stay as they are. The first step then traces the model and builds its
    kernels: the loop times it as the warm-up."""
    for module in modules:
        module.compile()
