"""Upper bounds for config numbers: a typo like `resolution: 51200` or `batch_size: 1000000` is refused
up front with the key named, instead of failing an hour later with out-of-memory (or running for a
year with `max_train_steps: 1e12`). The bounds are far above any real LoRA run.

Applied wherever a config is accepted: the daemon's submit, its worker, and `train` on the CLI.
(Candidates to join shared/config.py's range checks once the config module settles.)
"""

from __future__ import annotations

from shared.errors import ConfigError

LIMITS = {
    "resolution": 8192,
    "batch_size": 4096,
    "gradient_accumulation_steps": 4096,
    "lora_rank": 4096,
    "max_train_steps": 10_000_000,
    "epochs": 1_000_000,
    "save_steps": 10_000_000,
    "max_seq_len": 1_048_576,
    "sample_max_tokens": 1_048_576,
}


def check_limits(cfg, source: str) -> None:
    for key, top in LIMITS.items():
        value = getattr(cfg, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > top:
            raise ConfigError(f"{source}: {key} must be at most {top:,}, got {value:,} (a typo?)")
