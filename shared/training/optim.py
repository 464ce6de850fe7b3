"""The optimizer and the learning-rate schedule, for every task.

`OPTIMIZERS` maps the config's `optimizer` to a builder over the task's parameter groups; a name
that cannot run on this device is refused by `check_optimizer` before the model loads. The schedule
is transformers' `get_scheduler` (the one kohya and the Hugging Face examples use): linear warm-up
from 0 over `lr_warmup_steps`, then the named decay. `constant` with warm-up steps warms up first
(our config has always meant "warm-up, then the schedule"); transformers' plain `constant` would not.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.errors import ConfigError


def _adamw(groups: list[dict], cfg):
    import torch

    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _adamw8bit(groups: list[dict], cfg):
    import bitsandbytes as bnb  # checked in check_optimizer before the model loaded

    return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)


def _needs_bitsandbytes(device) -> None:
    if device.type != "cuda":
        raise ConfigError("optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use `adamw` on this device")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("optimizer: adamw8bit needs the bitsandbytes package "
                          "(pip install bitsandbytes) or use `adamw`") from None


# name -> (builder(groups, cfg), check(device) that raises ConfigError where it cannot run)
OPTIMIZERS: dict[str, tuple[Callable, Callable | None]] = {
    "adamw": (_adamw, None),
    "adamw8bit": (_adamw8bit, _needs_bitsandbytes),
}


def check_optimizer(cfg, device) -> None:
    """Refuse an optimizer this device cannot run, before anything heavy loads."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer: unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    check = OPTIMIZERS[cfg.optimizer][1]
    if check is not None:
        check(device)


def build_optimizer(cfg, groups: list[dict]):
    """The optimizer over the task's parameter groups (each with its own `lr`)."""
    return OPTIMIZERS[cfg.optimizer][0](groups, cfg)


def build_schedule(cfg, optimizer, total_steps: int):
    """The learning-rate schedule, stepped once per optimizer step."""
    from transformers.optimization import get_scheduler

    name = cfg.lr_scheduler
    if name == "constant" and cfg.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps)
