"""The verdicts: what the scores of the evaluations mean for the user, with the threshold that decided
each and what to change. One function per verdict, reading the scores of every evaluation so far.

| verdict | when |
| --- | --- |
| `no_effect` | at the end: the effect score (SD: `effect`, LLM: `changed`) is below `verdict_min_effect` |
| `collapse` | SD: `collapse` below `verdict_collapse` while the LoRA has an effect; LLM: `identical` above `verdict_identical_answers` and above the base's |
| `overfitting` | the eval loss rose at `verdict_rising_checkpoints` evaluations in a row |
| `never_stops` | LLM: `unstopped` above `verdict_never_stops` |
| `repeats` | LLM: `repeats` above `verdict_repeats` |
"""

from __future__ import annotations

from dataclasses import dataclass

TITLES = {
    "no_effect": "no visible effect",
    "collapse": "overfitting / collapse",
    "overfitting": "overfitting",
    "never_stops": "never stops",
    "repeats": "repeats",
}


@dataclass
class Verdict:
    kind: str  # a key of TITLES
    message: str  # what was measured, against which threshold, and what to do
    step: int  # the evaluation that found it
    checkpoint: str = ""  # the checkpoint it recommends instead ("" where none)

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    def as_dict(self) -> dict:
        """The fields of the `verdict` event (shared/training/events.py): the kind goes as `verdict`."""
        return {"step": self.step, "verdict": self.kind, "title": self.title, "message": self.message,
                "checkpoint": self.checkpoint}


def _effect_name(scores: dict) -> str:
    return "effect" if "effect" in scores else "changed"


def no_effect(cfg, records: list, final: bool) -> Verdict | None:
    last = records[-1]
    name = _effect_name(last.scores)
    if not final or name not in last.scores or last.scores[name] >= cfg.verdict_min_effect:
        return None
    what = ("the pictures" if name == "effect" else "the answers")
    return Verdict("no_effect", (
        f"the LoRA barely changes {what} (effect score {last.scores[name]:.3f}, below verdict_min_effect "
        f"{cfg.verdict_min_effect:g}): raise learning_rate (now {cfg.learning_rate:g}), train more steps "
        f"(now {last.step}) or a higher lora_rank (now {cfg.lora_rank}), and check that the captions (or answers) "
        "describe what the LoRA should learn"), last.step)


def collapse(cfg, records: list, best: str) -> Verdict | None:
    scores, step = records[-1].scores, records[-1].step
    if "collapse" in scores:
        value = scores["collapse"]
        if value is None or value >= cfg.verdict_collapse or scores.get("effect", 0) < cfg.verdict_min_effect:
            return None
        found = (f"the LoRA's pictures for different prompts look alike (their spread is {value:.2f} of the "
                 f"base's, below verdict_collapse {cfg.verdict_collapse:g}): it paints what it was trained on "
                 "whatever the prompt")
    elif "identical" in scores:
        value = scores["identical"]
        if value <= cfg.verdict_identical_answers or value <= scores.get("base_identical", 0):
            return None
        found = (f"{value:.0%} of the prompts get an answer another prompt also got (above "
                 f"verdict_identical_answers {cfg.verdict_identical_answers:g}): the adapter answers from memory")
    else:
        return None
    instead = f"use the checkpoint {best}" if best else "use an earlier checkpoint (save_steps keeps them)"
    return Verdict("collapse", f"{found}; {instead}, lower learning_rate or the steps, or add more varied "
                               "training data", step, best)


def overfitting(cfg, records: list, best: str) -> Verdict | None:
    """The eval loss rose at N evaluations in a row at some point, and is still above its lowest."""
    losses = [(r.step, r.metrics["eval_loss"]) for r in records if "eval_loss" in r.metrics]
    n = cfg.verdict_rising_checkpoints
    rises = [i for i in range(n, len(losses))
             if all(losses[j][1] > losses[j - 1][1] for j in range(i - n + 1, i + 1))]
    low_step, low = min(losses, key=lambda sl: sl[1]) if losses else (0, 0.0)
    if not rises or losses[-1][1] <= low:
        return None
    tail = [loss for _, loss in losses[rises[0] - n: rises[0] + 1]]
    return Verdict("overfitting", (
        f"the eval loss rose at {n} evaluations in a row ({' -> '.join(f'{v:.4f}' for v in tail)} by step "
        f"{losses[rises[0]][0]}; lowest {low:.4f} at step {low_step}, now {losses[-1][1]:.4f}): the LoRA learns the "
        "training set rather than the task; "
        + (f"use the checkpoint {best}" if best else f"use the checkpoint of step {low_step}")
        + ", or train fewer steps or at a lower learning_rate"), losses[-1][0], best)


def never_stops(cfg, records: list) -> Verdict | None:
    scores, step = records[-1].scores, records[-1].step
    if scores.get("unstopped", 0) <= cfg.verdict_never_stops:
        return None
    return Verdict("never_stops", (
        f"{scores['unstopped']:.0%} of the answers ran into the token limit ({scores.get('longest')} new tokens, "
        f"eval_max_tokens) without an end-of-turn token (the base model's: {scores.get('base_unstopped', 0):.0%}): the training labels "
        "probably lack the end-of-sequence token (a data collator that masks the pad token, set to EOS, masks "
        "it too), or the chat template ends turns with a marker generation does not stop at; check "
        "chat_template and the data, and raise eval_max_tokens if the answers are meant to be long"), step)


def repeats(cfg, records: list) -> Verdict | None:
    scores, step = records[-1].scores, records[-1].step
    if scores.get("repeats", 0) <= cfg.verdict_repeats:
        return None
    return Verdict("repeats", (
        f"{scores['repeats']:.0%} of the answers' 4-token sequences repeat earlier ones (above verdict_repeats "
        f"{cfg.verdict_repeats:g}; the base model's: {scores.get('base_repeats', 0):.0%}): the adapter loops; "
        "train fewer steps or at a lower learning_rate, add varied answers, or check that answers end with the "
        "end-of-sequence token"), step)


def judge(cfg, records: list, final: bool, best: str) -> list[Verdict]:
    """Every verdict that holds after the latest evaluation (`records[-1]`)."""
    found = [no_effect(cfg, records, final), collapse(cfg, records, best), overfitting(cfg, records, best),
             never_stops(cfg, records), repeats(cfg, records)]
    return [v for v in found if v is not None]
