"""How much memory a job may use: the budget the memory planner (shared/training/memory.py) fits it in."""

from .setting import Setting

SECTION = "Memory"
SETTINGS = (
    Setting("memory_budget", str, "auto", "Peak memory the job may use: `auto` (CUDA: the card's free memory; CPU: "
            "the available RAM; minus 10%), a number of GB (2**30 bytes, as nvidia-smi shows them), or `off` "
            "(estimate only). The job runs as configured when its estimate fits; else the planner picks the "
            "fastest settings that fit (gradient checkpointing, a smaller batch_size with more accumulation, "
            "caches, adamw8bit on CUDA) and an out-of-memory job is retried once with the next cheaper plan "
            "(not with `off`). A job that cannot fit is refused before it loads (docs/memory.md).",
            pattern=r"auto|off|[0-9]+(\.[0-9]+)?", pattern_help="auto, off or a number of GB such as 11.5"),
)
RULES = ()
