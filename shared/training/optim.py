"""The optimizer and the learning-rate schedule, for every task.

`OPTIMIZERS` maps the config's `optimizer` to how it is built over the task's parameter groups, what it
needs to run (a package, a CUDA device) and how it reports the rate it used. A name that cannot run here
is refused by `check_optimizer` before the model loads, in one line, and so are `optimizer_args` the
optimizer refuses (it is built once on a dummy parameter to find out). The names each optimizer takes
are declared in shared/schema/optimizer.py, so the daemon refuses a misspelt one at submit.

The schedule is transformers' `get_scheduler` (the one kohya and the Hugging Face examples use): linear
warm-up from 0 over `lr_warmup_steps` (or `lr_warmup_ratio` of the run), then the named decay.
`constant` with warm-up steps warms up first (our config has always meant "warm-up, then the
schedule"); transformers' plain `constant` would not. Two optimizers bring their own:

- Adafactor with `relative_step` computes a time-dependent rate itself (`learning_rate` does not
  apply); transformers' `AdafactorSchedule` reads it back for the events.
- Schedule-free AdamW needs no decay (its iterate average replaces it) and warms up inside itself.
  It trains at one point of its sequence and keeps the average it is meant to be used at:
  `averaged_weights` swaps the average in for evaluating and saving (`optimizer.eval()`) and back
  for training (`optimizer.train()`).

Prodigy estimates its own step size d; its `learning_rate` multiplies d, and the rate it reports is
d * lr (`current_lr`), the rate its next step takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ConfigError


@dataclass(frozen=True)
class OptimizerKind:
    """One entry of `OPTIMIZERS`."""

    build: Callable  # (groups, cfg, args, warmup) -> a torch optimizer
    package: str | None = None  # the module it imports ...
    pip: str | None = None  # ... and the package that installs it
    needs_cuda: bool = False
    reported_lr: Callable | None = None  # (param group) -> the rate, where the schedule does not tell it


def _adamw(groups, cfg, args, warmup):
    import torch

    # torch's fused kernel (CPU and CUDA): one pass over all parameters instead of a loop of ops
    devices = {p.device.type for group in groups for p in group["params"]}
    if devices <= {"cpu", "cuda"}:
        args = {**args, "fused": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **args)


def _adamw8bit(groups, cfg, args, warmup):
    import bitsandbytes as bnb  # checked in check_optimizer before the model loaded

    return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **args)


def _prodigy(groups, cfg, args, warmup):
    import io

    from prodigyopt import Prodigy

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on stdout
        return Prodigy(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **args)


def _adafactor(groups, cfg, args, warmup):
    from transformers.optimization import Adafactor

    relative = bool(args.get("relative_step", False))
    # A fixed rate unless asked (what kohya recommends for LoRA). With relative steps, no parameter
    # scaling by default: it scales each step by the tensor's RMS, and LoRA's up-projection starts at
    # zero, so it would move at 1e-3 of the rate; no warm-up init either (its rate starts at 1e-6 x
    # step). Both can be asked for in optimizer_args.
    options = {"scale_parameter": False, "relative_step": relative, "warmup_init": False, **args}
    return Adafactor(groups, lr=None if relative else cfg.learning_rate, weight_decay=cfg.weight_decay, **options)


def _lion(groups, cfg, args, warmup):
    from lion_pytorch import Lion

    return Lion(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **args)


def _adamw_schedulefree(groups, cfg, args, warmup):
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=warmup,
                                  **args)
    optimizer.train()  # it refuses to step until told it is training
    return optimizer


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(_adamw),
    "adamw8bit": OptimizerKind(_adamw8bit, "bitsandbytes", "bitsandbytes", needs_cuda=True),
    "prodigy": OptimizerKind(_prodigy, "prodigyopt", "prodigyopt", reported_lr=lambda g: g["d"] * g["lr"]),
    "adafactor": OptimizerKind(_adafactor),
    "lion": OptimizerKind(_lion, "lion_pytorch", "lion-pytorch"),
    "adamw_schedulefree": OptimizerKind(_adamw_schedulefree, "schedulefree", "schedulefree",
                                        reported_lr=lambda g: g["scheduled_lr"]),
}


def _args(cfg) -> dict:
    """`optimizer_args` as the constructors take them (YAML lists as tuples: betas, eps)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (getattr(cfg, "optimizer_args", None) or {}).items()}


def relative_adafactor(cfg) -> bool:
    return cfg.optimizer == "adafactor" and bool(_args(cfg).get("relative_step"))


def check_optimizer(cfg, device) -> None:
    """Refuse an optimizer this device or environment cannot run, or arguments it refuses, before
    anything heavy loads."""
    import importlib

    import torch

    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer: unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    kind = OPTIMIZERS[name]
    if kind.needs_cuda and device.type != "cuda":
        raise ConfigError(f"optimizer: {name} needs a CUDA GPU ({kind.pip}); use `adamw` on this device")
    if kind.package:
        try:
            importlib.import_module(kind.package)
        except ImportError:
            raise ConfigError(f"optimizer: {name} needs the {kind.pip} package (pip install {kind.pip}), or "
                              "choose another optimizer") from None
    probe = [{"params": [torch.zeros(1, requires_grad=True)], "lr": cfg.learning_rate}]
    try:
        kind.build(probe, cfg, _args(cfg), 0)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        words = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"optimizer_args: {name} refused {_args(cfg) or 'its settings'} ({words})") from None


def warmup_steps(cfg, total_steps: int) -> int:
    """The warm-up in steps: `lr_warmup_steps`, or `lr_warmup_ratio` of the run."""
    return cfg.lr_warmup_steps or round(getattr(cfg, "lr_warmup_ratio", 0.0) * total_steps)


def build_optimizer(cfg, groups: list[dict], total_steps: int = 0):
    """The optimizer over the task's parameter groups (each with its own `lr`)."""
    return OPTIMIZERS[cfg.optimizer].build(groups, cfg, _args(cfg), warmup_steps(cfg, total_steps))


def build_schedule(cfg, optimizer, total_steps: int):
    """The learning-rate schedule, stepped once per optimizer step."""
    from transformers.optimization import AdafactorSchedule, get_scheduler

    if relative_adafactor(cfg):
        return AdafactorSchedule(optimizer)
    if OPTIMIZERS[cfg.optimizer].build is _adamw_schedulefree:
        return get_scheduler("constant", optimizer)  # no decay; it warms up itself
    name, warmup = cfg.lr_scheduler, warmup_steps(cfg, total_steps)
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    extra = {"cosine_with_restarts": {"num_cycles": getattr(cfg, "lr_scheduler_num_cycles", 1)},
             "polynomial": {"power": getattr(cfg, "lr_scheduler_power", 1.0)}}.get(name)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)


def schedule_note(cfg) -> str | None:
    """A log line where the configured schedule is not the one that runs, or None."""
    if relative_adafactor(cfg):
        return "adafactor with relative_step: its own time-dependent rate; learning_rate and lr_scheduler do not apply"
    if cfg.optimizer == "adamw_schedulefree" and cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
        return (f"adamw_schedulefree: no decay schedule (lr_scheduler {cfg.lr_scheduler} does not apply); the "
                "warm-up runs inside the optimizer")
    return None


def optimizer_name(cfg) -> str:
    """The optimizer as kohya records it in `ss_optimizer`: its name and arguments, e.g. `prodigy(d_coef=2)`."""
    args = ",".join(f"{k}={v}" for k, v in _args(cfg).items())
    return f"{cfg.optimizer}({args})" if args else cfg.optimizer


def schedule_name(cfg) -> str:
    """The schedule that runs (`ss_lr_scheduler`): the configured one, or the optimizer's own."""
    if relative_adafactor(cfg):
        return "adafactor"
    if cfg.optimizer == "adamw_schedulefree":
        return "constant (schedule-free)"
    return cfg.lr_scheduler


def current_lr(cfg, optimizer, scheduler) -> float:
    """The learning rate of the first group as the events and TensorBoard report it: Prodigy's adapted
    d * lr, schedule-free's warmed-up rate, else the schedule's (Adafactor's relative step included)."""
    report = OPTIMIZERS[cfg.optimizer].reported_lr
    value = report(optimizer.param_groups[0]) if report else scheduler.get_last_lr()[0]
    return float(value)


@contextlib.contextmanager
def averaged_weights(optimizer):
    """A schedule-free optimizer's average in the parameters for the block (evaluate, sample, save),
    its training point after; nothing for other optimizers."""
    if "train_mode" not in optimizer.param_groups[0]:
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
