"""The optimisation: batch, length, learning rate, gradients, the noise loss options, precision and device (the
optimizer and its schedule: optimizer.py)."""

from .optimizer import learning_rate_problem
from .setting import SD_ONLY, Form, Rule, Setting

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
    Setting("learning_rate", float, 2e-4, "Learning rate; its range follows the optimizer: below 1 for adamw, "
            "adamw8bit, lion, adafactor and adamw_schedulefree (1e-4 to 5e-4 is usual for AdamW, about a third "
            "of that for Lion); for prodigy a multiplier of its own estimate, 0.1 to 10 (1.0 is usual).", minimum=0,
            exclusive_minimum=True, maximum=10, form=Form("basic", "Learning rate", id="lr", step=1e-5)),
    Setting("max_grad_norm", float, 1.0, "Clip gradients to this norm (0 disables).", minimum=0,
            form=Form(step=0.1)),
    Setting("noise_offset", float, 0.0, "Offset noise strength (0.05-0.1 helps very dark/bright images).",
            tasks=SD_ONLY, minimum=0, maximum=1, form=Form(step=0.01)),
    Setting("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (5 is common); empty disables.",
            tasks=SD_ONLY, optional=True, minimum=0, exclusive_minimum=True),
    # numpy's seeding (through accelerate's set_seed) takes 0 .. 2**32 - 1
    Setting("seed", int, 42, "Random seed for init, noise, timesteps and data order.", minimum=0,
            maximum=2**32 - 1, form=Form("basic", "Seed")),
    Setting("mixed_precision", str, "auto", "The compute type; the frozen base weights are stored in it, the "
            "trained weights and optimizer state stay fp32. auto: bf16 on a card (or CPU) with bf16 arithmetic "
            "(CUDA Ampere or newer, AVX512-BF16/AMX CPUs), fp16 with a gradient scaler on older cards, no (fp32) "
            "elsewhere.", choices=("auto", "no", "fp16", "bf16")),
    Setting("compile", bool, False, "torch.compile the UNet: faster steps after a warm-up of the first steps (often "
            "minutes; its time is logged). Needs a C++ compiler on the CPU and Triton on CUDA.", tasks=SD_ONLY),
    Setting("channels_last", str, "auto", "Run the UNet's convolutions on channels-last (NHWC) tensors: 4-7% "
            "faster steps on CPUs with bf16 for about half the convolution weights' size in memory (the memory plan turns it off when "
            "it does not fit). auto: yes on a CPU under bf16, no elsewhere (not yet measured on cards).",
            tasks=SD_ONLY, choices=("auto", "yes", "no")),
    Setting("gradient_checkpointing", bool, False, "Trade compute for memory in the UNet / LM / Flux transformer (a "
            "Flux job on a GPU always checkpoints: its activations at 1024 px need it)."),
    Setting("device", str, "auto", f"{DEVICE_HELP}.", pattern=DEVICE_PATTERN, pattern_help=DEVICE_HELP),
)


def _learning_rate_fits_the_optimizer(v) -> str | None:
    return learning_rate_problem(v["optimizer"], v["learning_rate"], v["text_encoder_lr"], v["optimizer_args"])


RULES = (Rule(("learning_rate", "optimizer", "text_encoder_lr"), _learning_rate_fits_the_optimizer),)
