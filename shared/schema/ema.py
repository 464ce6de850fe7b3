"""An exponential moving average of the trained adapter weights, exported in their place."""

from .setting import IMAGES, Rule, Setting

SECTION = "EMA"
SETTINGS = (
    Setting("use_ema", bool, False, "Keep an exponential moving average of the LoRA weights and write it, not the "
            "last weights, as the LoRA (checkpoints, samples and the final file).", tasks=IMAGES),
    Setting("ema_decay", float, 0.999, "The average's decay per update; the first updates use min(decay, (1 + n) "
            "/ (10 + n)) so it leaves the initial weights quickly.", tasks=IMAGES, minimum=0, exclusive_minimum=True,
            maximum=1, exclusive_maximum=True),
    Setting("ema_update_every", int, 1, "Update the average every N optimizer steps.", tasks=IMAGES, minimum=1,
            maximum=1_000_000),
)


def _one_average(v) -> str | None:
    if v["use_ema"] and v["optimizer"] == "adamw_schedulefree":
        return ("use_ema: adamw_schedulefree already writes an average of its iterates; turn use_ema off or choose "
                "another optimizer")
    return None


def _options_need_ema(v) -> str | None:
    if not v["use_ema"] and (v["ema_decay"] != 0.999 or v["ema_update_every"] != 1):
        key = "ema_decay" if v["ema_decay"] != 0.999 else "ema_update_every"
        return f"{key} has no effect without use_ema: true; turn use_ema on or remove {key}"
    return None


RULES = (Rule(("use_ema", "optimizer"), _one_average, tasks=IMAGES),
         Rule(("ema_decay", "ema_update_every", "use_ema"), _options_need_ema, tasks=IMAGES))
