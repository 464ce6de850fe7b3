"""What the trainer shows while it trains: sample images (SD, Flux) or answers (LLM)."""

from .setting import IMAGES, LLM_ONLY, Form, Setting

SECTION = "Samples"
SETTINGS = (
    Setting("sample_prompts", list, None, "SD, Flux: prompts rendered with a fixed seed during and after training. LLM: "
            "prompts answered greedily at each checkpoint and at the end (default: up to 3 prompts from the data).",
            optional=True, form=Form(widget="lines")),
    Setting("sample_every_n_steps", int, 0, "Sample every N steps (SD, Flux: render sample_prompts; LLM: answer them) "
            "(0: SD and Flux only at the end, LLM at each checkpoint and the end).", minimum=0, maximum=10_000_000),
    Setting("preview", bool, True, "SD, Flux: write <name>.preview.png beside the LoRA (the picture on its "
            "AUTOMATIC1111/Forge card): the first sample prompt at preferred_weight, or without sample_prompts a "
            "training caption. false: no preview.", tasks=IMAGES),
    Setting("sample_steps", int, None, "Denoising steps per sample image. Default: 20 (SD, FLUX.1-dev), 4 "
            "(FLUX.1-schnell, distilled for few steps).", tasks=IMAGES, optional=True, minimum=1, maximum=1000),
    Setting("sample_max_tokens", int, 64, "Most new tokens per sample generation.", tasks=LLM_ONLY, minimum=1,
            maximum=1_048_576),
)
RULES = ()
