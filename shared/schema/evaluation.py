"""What the trainer checks about the LoRA it made: when, on which prompts, and the thresholds of its verdicts.

The thresholds were chosen from measurements on the tiny test models (docs/evaluation.md lists them):
each default sits between the scores of the jobs that must get the verdict and those that must not.
"""

from .setting import LLM_ONLY, SD_ONLY, Form, Setting

SECTION = "Evaluation"
_NUMBER = r"\s*-?(10(\.0*)?|\d(\.\d*)?|\.\d+)\s*"
WEIGHTS_PATTERN = rf"{_NUMBER}(,{_NUMBER})*"
SETTINGS = (
    Setting("evaluation", bool, True, "Judge the LoRA at checkpoints and at the end: SD renders the evaluation "
            "prompts at fixed seeds with the LoRA off and on, an LLM answers them before and after; the scores "
            "and verdicts go to the events, the result and report.html. false: no renders or answers (the report "
            "still shows the losses).", form=Form(label="Evaluate the LoRA")),
    Setting("eval_every_n_checkpoints", int, 1, "Evaluate at every Nth saved checkpoint (save_steps) and always at "
            "the end (0: only at the end).", minimum=0, maximum=1_000_000),
    Setting("eval_prompts", list, None, "Prompts the evaluation renders (SD) or answers (LLM). Default: the first "
            "eval_prompt_count sample_prompts; without them, training captions plus one unrelated prompt (SD) or "
            "held-out prompts, else training prompts (LLM).", optional=True, min_items=1, form=Form(widget="lines")),
    Setting("eval_prompt_count", int, 3, "How many prompts the evaluation uses when eval_prompts is not set (at "
            "least 2: the collapse check compares prompts).", minimum=2, maximum=64),
    Setting("eval_weights", str, "1", "SD: the LoRA weights the evaluation renders beside the base (weight 0), "
            "comma-separated; weight 1 is always among them (the scores are taken there).", tasks=SD_ONLY,
            pattern=WEIGHTS_PATTERN, pattern_help="LoRA weights between -10 and 10 separated by commas, e.g. 0.5, 1"),
    Setting("eval_sample_steps", int, 10, "SD: denoising steps per evaluation picture. Fewer than sample_steps "
            "keeps the evaluation under a tenth of a default job's time; the base and the LoRA are rendered alike, "
            "so the scores compare like with like.", tasks=SD_ONLY, minimum=1, maximum=1000),
    Setting("eval_max_tokens", int, None, "LLM: most new tokens per evaluation answer; an answer that reaches it "
            "without an end-of-turn token counts as not stopping. Default: twice the longest answer in the training "
            "data (at least 32, at most 1024).", tasks=LLM_ONLY, optional=True, minimum=8, maximum=1_048_576),
    Setting("verdict_min_effect", float, 0.05, "'No visible effect' below this effect score. SD: how far the LoRA at "
            "weight 1 moves the images from the base's, relative to how far two base seeds differ. LLM: the share "
            "of answer tokens that changed from the base's answers.", minimum=0, maximum=10, form=Form(step=0.01)),
    Setting("verdict_collapse", float, 0.35, "SD: 'overfitting / collapse' when the LoRA's images for different "
            "prompts are this much more alike than the base's (their distance ratio falls below it).",
            tasks=SD_ONLY, minimum=0, maximum=1, form=Form(step=0.01)),
    Setting("verdict_identical_answers", float, 0.5, "LLM: 'overfitting / collapse' when more than this share of "
            "the prompts get an answer another prompt also got (and more than the base's).", tasks=LLM_ONLY,
            minimum=0, maximum=1, exclusive_maximum=True, form=Form(step=0.05)),
    Setting("verdict_rising_checkpoints", int, 2, "'Overfitting' when the eval loss rose at this many evaluations in "
            "a row (needs a validation split); names the best checkpoint.", minimum=1, maximum=1000),
    Setting("verdict_never_stops", float, 0.5, "LLM: 'never stops' when more than this share of the answers reach "
            "eval_max_tokens without an end-of-turn token.", tasks=LLM_ONLY, minimum=0, maximum=1,
            exclusive_maximum=True, form=Form(step=0.05)),
    Setting("verdict_repeats", float, 0.5, "LLM: 'repeats' when the answers' share of repeated 4-token sequences "
            "is above this on average.", tasks=LLM_ONLY, minimum=0, maximum=1, exclusive_maximum=True,
            form=Form(step=0.05)),
)
RULES = ()


def eval_weights(text: str) -> list[float]:
    """The weights `eval_weights` names, in order, with 1 added when it is missing."""
    weights = [float(part) for part in str(text).split(",") if part.strip()]
    return weights if 1.0 in weights else [*weights, 1.0]
