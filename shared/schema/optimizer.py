"""The optimizer and its learning-rate schedule: which optimizer, its extra arguments, the schedule and its
warm-up. (`learning_rate` itself sits with the basic training settings; its range follows the optimizer,
checked by `learning_rate_problem` below.)"""

import difflib

from .setting import IMAGES, Form, Rule, Setting

SECTION = "Optimizer"

# The keyword arguments `optimizer_args` may give each optimizer: its constructor's, less `params`, `lr` and
# `weight_decay` (those have their own keys) and the ones that only pick an implementation (foreach, fused,
# use_triton, ...). tests/test_sd_optimizers.py holds them to the real signatures.
OPTIMIZER_ARGS: dict[str, tuple[str, ...]] = {
    "adamw": ("betas", "eps", "amsgrad"),
    "adamw8bit": ("betas", "eps", "amsgrad", "min_8bit_size", "percentile_clipping", "block_wise", "is_paged"),
    "prodigy": ("betas", "beta3", "eps", "decouple", "use_bias_correction", "safeguard_warmup", "d0", "d_coef",
                "growth_rate", "slice_p"),
    "adafactor": ("eps", "clip_threshold", "decay_rate", "beta1", "scale_parameter", "relative_step", "warmup_init"),
    "lion": ("betas", "decoupled_weight_decay"),
    "adamw_schedulefree": ("betas", "eps", "r", "weight_lr_power"),
}
OWN_KEYS = {"lr": "learning_rate", "weight_decay": "weight_decay", "warmup_steps": "lr_warmup_steps",
            "params": None}
MULTIPLIER_RANGE = (0.1, 10.0)  # Prodigy's learning rate: a factor on the step size it estimates itself
SCHEDULES = ("cosine", "cosine_with_restarts", "linear", "constant", "constant_with_warmup", "polynomial")

SETTINGS = (
    Setting("optimizer", str, "adamw", "adamw: torch's AdamW. adamw8bit: bitsandbytes' 8-bit AdamW (a CUDA GPU). "
            "prodigy: Prodigy (prodigyopt), which estimates its own step size; learning_rate is then a multiplier "
            "(1.0). adafactor: transformers' Adafactor at learning_rate, or with optimizer_args {relative_step: true} "
            "its own time-dependent rate. lion: Lion (lion-pytorch; about a third of AdamW's rate). "
            "adamw_schedulefree: schedule-free AdamW (schedulefree): no decay schedule, lr_scheduler does not "
            "apply; the warm-up runs inside it.", tasks=IMAGES, choices=tuple(OPTIMIZER_ARGS)),
    Setting("optimizer_args", dict, None, "Extra keyword arguments of the optimizer, e.g. {d_coef: 2, "
            "safeguard_warmup: true} for prodigy or {betas: [0.9, 0.99]}; each optimizer's names are in "
            "docs/sd-training.md. (A mapping: in the tab and the node, the YAML box.)", tasks=IMAGES, optional=True,
            form=Form("hidden")),
    Setting("weight_decay", float, 0.01, "Decoupled weight decay of the optimizer.", minimum=0, maximum=1,
            form=Form(step=0.01)),
    Setting("lr_scheduler", str, "cosine", "Learning-rate schedule after warm-up (transformers' schedules): "
            "cosine, cosine_with_restarts (lr_scheduler_num_cycles), linear, constant, constant_with_warmup, "
            "polynomial (lr_scheduler_power).", choices=SCHEDULES),
    Setting("lr_warmup_steps", int, 0, "Linear warm-up steps at the start.", minimum=0, maximum=10_000_000),
    Setting("lr_warmup_ratio", float, 0.0, "Warm-up as a share of all steps (0.05 = the first 5%); instead of "
            "lr_warmup_steps.", minimum=0, maximum=1, exclusive_maximum=True),
    Setting("lr_scheduler_num_cycles", int, 1, "cosine_with_restarts: how many cosine cycles (each restarts at "
            "the full rate).", minimum=1, maximum=10_000),
    Setting("lr_scheduler_power", float, 1.0, "polynomial: the decay's power (1: linear, 2: quadratic).",
            minimum=0, exclusive_minimum=True, maximum=100),
)


def learning_rate_problem(optimizer: str, lr: float, text_encoder_lr: float | None, args: dict | None) -> str | None:
    """What is wrong with a learning rate for `optimizer`, in words, or None."""
    args = args or {}
    if optimizer == "adafactor" and args.get("relative_step"):
        return None  # Adafactor's relative step computes its own rate; learning_rate does not apply
    for key, value in (("learning_rate", lr), ("text_encoder_lr", text_encoder_lr)):
        if value is None:
            continue
        if optimizer == "prodigy":
            low, high = MULTIPLIER_RANGE
            if not low <= value <= high:
                return (f"{key}: with optimizer prodigy it is a multiplier of Prodigy's own step-size estimate "
                        f"and must be between {low:g} and {high:g} (1.0 is usual), got {value:g}")
        elif value >= 1:
            return (f"{key} must be less than 1 for optimizer {optimizer}, got {value:g} (a multiplier such as 1.0 "
                    "is what optimizer: prodigy takes)")
    return None


def _args_are_the_optimizers(v) -> str | None:
    name, args = v["optimizer"], v["optimizer_args"] or {}
    known = OPTIMIZER_ARGS.get(name, ())
    for key in args:
        if key in OWN_KEYS:
            own = OWN_KEYS[key]
            return (f"optimizer_args: {key} has its own key; set {own} instead" if own
                    else f"optimizer_args: {key} is not an argument you can give")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return (f"optimizer_args: {name} takes no argument {key!r}{hint}; it takes "
                    f"{', '.join(known) if known else 'none'}")
    return None


def _one_warm_up(v) -> str | None:
    if v["lr_warmup_steps"] and v["lr_warmup_ratio"]:
        return "lr_warmup_steps and lr_warmup_ratio both set the warm-up; keep one"
    return None


def _schedule_options_fit(v) -> str | None:
    if v["lr_scheduler_num_cycles"] != 1 and v["lr_scheduler"] != "cosine_with_restarts":
        return (f"lr_scheduler_num_cycles applies to lr_scheduler: cosine_with_restarts, not {v['lr_scheduler']}; "
                "set that schedule or remove lr_scheduler_num_cycles")
    if v["lr_scheduler_power"] != 1.0 and v["lr_scheduler"] != "polynomial":
        return (f"lr_scheduler_power applies to lr_scheduler: polynomial, not {v['lr_scheduler']}; set that schedule "
                "or remove lr_scheduler_power")
    return None


def _eight_bit_on_cpu(v) -> str | None:
    if v["optimizer"] == "adamw8bit" and v["device"] in ("cpu", "mps"):
        return "optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use `adamw` on this device"
    return None


RULES = (
    Rule(("optimizer_args", "optimizer"), _args_are_the_optimizers, tasks=IMAGES),
    Rule(("lr_warmup_ratio", "lr_warmup_steps"), _one_warm_up),
    Rule(("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler"), _schedule_options_fit),
    Rule(("optimizer", "device"), _eight_bit_on_cpu, tasks=IMAGES),
)
