"""Run one training job from a validated config: pick the SD or LLM trainer by task."""

from __future__ import annotations

from shared.config import TrainConfig, detect_task
from shared.errors import ConfigError
from shared.reporting import Reporter, TrainResult


def run_training(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    task = detect_task(cfg)
    if task == "sd":
        from shared.sd.trainer import train_sd

        return train_sd(cfg, reporter)
    if task == "llm":
        from shared.llm.trainer import train_llm

        return train_llm(cfg, reporter)
    raise ConfigError(f"task: unknown task {task!r}; use sd or llm")
