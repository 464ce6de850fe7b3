"""The optimisation: batch, length, learning rate and schedule, precision and device."""

from .setting import IMAGES, SD_ONLY, Form, Rule, Setting

SECTION = "Training"
DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu)(:[0-9]{1,3})?"
DEVICE_HELP = "auto, cpu, cuda, cuda:N, xpu, xpu:N or mps"

SETTINGS = (
    Setting("batch_size", int, 1, "Images (or sequences) per step on each device.", minimum=1, maximum=4096,
            form=Form("basic", "Batch size", id="batch")),
    Setting("gradient_accumulation_steps", int, 1, "Micro-batches summed before each optimizer step.", minimum=1,
            maximum=4096),
    Setting("epochs", int, 10, "Passes over the data set (ignored when max_train_steps is set).", minimum=1,
            maximum=1_000_000, form=Form("basic", "Epochs")),
    Setting("max_train_steps", int, None, "Stop after this many optimizer steps (empty: train for `epochs`).",
            optional=True, minimum=1, maximum=10_000_000, form=Form("basic", "Steps", id="steps")),
    Setting("learning_rate", float, 2e-4, "AdamW learning rate.", minimum=0, exclusive_minimum=True, maximum=1,
            exclusive_maximum=True, form=Form("basic", "Learning rate", id="lr", step=1e-5)),
    Setting("optimizer", str, "adamw", "adamw8bit needs bitsandbytes and a CUDA GPU.", tasks=IMAGES,
            choices=("adamw", "adamw8bit")),
    Setting("weight_decay", float, 0.01, "AdamW weight decay.", minimum=0, maximum=1, form=Form(step=0.01)),
    Setting("max_grad_norm", float, 1.0, "Clip gradients to this norm (0 disables).", minimum=0,
            form=Form(step=0.1)),
    Setting("lr_scheduler", str, "cosine", "Learning-rate schedule after warm-up.",
            choices=("cosine", "linear", "constant", "constant_with_warmup")),
    Setting("lr_warmup_steps", int, 0, "Linear warm-up steps at the start.", minimum=0, maximum=10_000_000),
    Setting("noise_offset", float, 0.0, "Offset noise strength (0.05-0.1 helps very dark/bright images).",
            tasks=SD_ONLY, minimum=0, maximum=1, form=Form(step=0.01)),
    Setting("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (5 is common); empty disables.",
            tasks=SD_ONLY, optional=True, minimum=0, exclusive_minimum=True),
    # numpy's seeding (through accelerate's set_seed) takes 0 .. 2**32 - 1
    Setting("seed", int, 42, "Random seed for init, noise, timesteps and data order.", minimum=0,
            maximum=2**32 - 1, form=Form("basic", "Seed")),
    Setting("mixed_precision", str, "no", "Mixed precision (GPU only).", choices=("no", "fp16", "bf16")),
    Setting("gradient_checkpointing", bool, False, "Trade compute for memory in the UNet / LM / Flux transformer (a "
            "Flux job on a GPU always checkpoints: its activations at 1024 px need it)."),
    Setting("device", str, "auto", f"{DEVICE_HELP}.", pattern=DEVICE_PATTERN, pattern_help=DEVICE_HELP),
)


def _eight_bit_on_cpu(v) -> str | None:
    if v["optimizer"] == "adamw8bit" and v["device"] in ("cpu", "mps"):
        return "optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use `adamw` on this device"
    return None


RULES = (Rule(("optimizer", "device"), _eight_bit_on_cpu, tasks=IMAGES),)
