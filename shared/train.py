"""Run one training job from a validated config: pick the SD or LLM trainer by task.

A config that asks for several processes (or names an accelerate config) is run through
`accelerate launch` (shared/distributed.py); each rank then comes back here, to `train_task`.
"""

from __future__ import annotations

from shared.config import TrainConfig, detect_task
from shared.errors import ConfigError
from shared.reporting import ConsoleReporter, Reporter, TrainResult


def run_training(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    from shared.distributed import launch_training, wants_launch

    if wants_launch(cfg):
        return launch_training(cfg, reporter or ConsoleReporter())
    return train_task(cfg, reporter)


def train_task(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """The trainer for the config's task, in this process (one rank of a multi-process run, or all of it)."""
    task = detect_task(cfg)
    if task == "sd":
        from shared.sd.trainer import train_sd

        return train_sd(cfg, reporter)
    if task == "llm":
        from shared.llm.trainer import train_llm

        return train_llm(cfg, reporter)
    raise ConfigError(f"task: unknown task {task!r}; use sd or llm")
