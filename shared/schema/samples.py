"""What the trainer shows while it trains: sample images (SD) or answers (LLM)."""

from .setting import LLM_ONLY, SD_ONLY, Form, Setting

SECTION = "Samples"
SETTINGS = (
    Setting("sample_prompts", list, None, "SD: prompts rendered with a fixed seed during and after training. LLM: "
            "prompts answered greedily at each checkpoint and at the end (default: up to 3 prompts from the data).",
            optional=True, form=Form(widget="lines")),
    Setting("sample_every_n_steps", int, 0, "Render sample_prompts every N steps (0: only at the end).",
            tasks=SD_ONLY, minimum=0, maximum=10_000_000),
    Setting("sample_steps", int, 20, "Denoising steps per sample image.", tasks=SD_ONLY, minimum=1, maximum=1000),
    Setting("sample_max_tokens", int, 64, "Most new tokens per sample generation.", tasks=LLM_ONLY, minimum=1,
            maximum=1_048_576),
)
RULES = ()
