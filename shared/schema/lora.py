"""The adapter: rank, alpha, initialisation, and which modules get one."""

from .setting import IMAGES, LLM_ONLY, SD_LLM, SD_ONLY, Form, Setting

SECTION = "LoRA"
SETTINGS = (
    Setting("lora_rank", int, 8, "LoRA rank (network dim).", minimum=1, maximum=4096,
            form=Form("basic", "Rank", id="rank")),
    Setting("lora_alpha", float, 16.0, "LoRA alpha; the update is scaled by alpha / rank.", minimum=0,
            exclusive_minimum=True, maximum=65536, form=Form("basic", "Alpha", id="alpha", step=0.5)),
    Setting("lora_dropout", float, 0.1, "Dropout on the LoRA input during training.", minimum=0, maximum=1,
            exclusive_maximum=True, form=Form(step=0.05)),
    Setting("lora_init", str, "default", "LoRA init: default (Kaiming A, zero B) or gaussian (A ~ N(0, 1/rank), "
            "zero B).", choices=("default", "gaussian")),
    Setting("lora_init_std", float, None, "Std of the gaussian LoRA init of A. Default: 1/rank.", tasks=IMAGES,
            optional=True, minimum=0, exclusive_minimum=True),
    Setting("use_dora", bool, False, "DoRA (weight-decomposed LoRA). SD: a magnitude per input column, exported as "
            "kohya `dora_scale` the way A1111/ComfyUI apply it; LLM: PEFT's DoRA.", tasks=SD_LLM),
    Setting("conv_rank", int, 0, "LoCon: LoRA rank on the ResBlock 3x3 convs too (0: off).", tasks=SD_ONLY,
            minimum=0, maximum=4096),
    Setting("conv_alpha", float, None, "LoCon alpha. Default: conv_rank.", tasks=SD_ONLY, optional=True, minimum=0,
            exclusive_minimum=True),
    Setting("train_text_encoder", bool, False, "Also train LoRA on the text encoder(s) (Flux: CLIP-L; T5 stays "
            "frozen).", tasks=IMAGES),
    Setting("text_encoder_lr", float, None, "Learning rate of the text-encoder LoRA. Default: learning_rate.",
            tasks=IMAGES, optional=True, minimum=0, exclusive_minimum=True),
    Setting("use_rslora", bool, False, "Rank-stabilised LoRA (scale alpha/sqrt(rank) instead of alpha/rank).",
            tasks=LLM_ONLY),
    Setting("target_modules", list, None, "Module names that get LoRA (e.g. [q_proj, v_proj] or [query_key_value]); "
            "default: every linear layer except the output head.", tasks=LLM_ONLY, optional=True, min_items=1),
)
RULES = ()
