"""The speed levers the loop applies for every task: `auto` settings resolved, and `compile`.

`auto` is resolved once, here, after the device is known and before the memory planner and the task
see the config, so every later reader (the task, the planner, the file's metadata, the resume
fingerprint) sees the value that was used: mixed precision (shared/training/precision.py) and the
image caches (`cache_plan` beside their settings in shared/schema/images.py). Each resolution is
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
    values = {name: getattr(cfg, name) for name in schema.TRAIN}
    for key, (value, reason) in cache_plan(values).items():
        if key in applies:
            changes[key] = value
            notes.append(f"{key} auto: {value} ({reason})")
    return dataclasses.replace(cfg, **changes), notes


def compile_modules(modules: list) -> None:
    """`compile: true`: compile the trained modules in place, so their parameter names (and the saved
    states and adapters) stay as they are. The first step then traces the model and builds its
    kernels: the loop times it as the warm-up."""
    for module in modules:
        module.compile()
