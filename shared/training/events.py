"""The events a training job sends, for every task: one kind, one set of fields.

The loop (shared/train.py) is the only sender; a task returns data and the loop turns it into
these events, so an SD job and an LLM job stream the same kinds with the same fields. The daemon
stores and forwards them (docs/protocol.md lists them with the daemon's own kinds).

| kind | fields |
| --- | --- |
| `memory_plan` | `device` (`cpu`: peak RSS is planned; `cuda`: VRAM), `budget_gb` (null with `memory_budget: off`), `estimate_gb`, `parts` (GB by part, `baseline` included), `settings` (every lever's value in the chosen plan), `changes` (those that differ from the config), `next` and `next_keeping_batch` (the fastest plan needing less memory, and the same among plans a saved state can continue: `settings`, `estimate_gb`, `time`, `changes`; null when none) |
| `buckets` | `histogram`: training items per size bucket (SD: `"WxH"` aspect-ratio buckets; LLM: token-length ranges `"33-64"`) |
| `cached` | `latents`, `text`: which caches were built before the first step (false where the task has none) |
| `started` | `total` steps, `step` (where a resumed run continues; 0 otherwise) |
| `progress` | `step`, `total`, `loss`, `lr`, `it_s`, `eta_s` (after each optimizer step; `lr`: the first group's rate for the next step, Prodigy's adapted d x lr) |
| `compiled` | `warmup_s`: the first step's seconds with `compile: true` (torch.compile builds its kernels then), after that step |
| `checkpoint` | `step`, `path` (the loadable adapter; "" for the state a stop writes), `state` (the training state folder); plus the evaluation's `METRICS` where the task computed them |
| `sample` | `step`, `paths` (the files holding the samples), `texts` (generated text per prompt; empty for image tasks) |
| `evaluation` | `step`, `scores` (name -> number: the task's `METRICS` and the evaluation's `SCORES`), `paths` (the evaluation grid and preview pictures; empty for text tasks), `final` (the evaluation at the end) |
| `verdict` | `step` (the evaluation that found it), `verdict` (`no_effect`, `collapse`, `overfitting`, `never_stops`, `repeats`), `title` (in words), `message` (what was measured against which threshold, and what to change), `checkpoint` (the checkpoint it recommends instead; "" where none) |
| `finished` | `outputs` (name -> path: `lora`, `deployed`, `report`, and the task's own such as `grid`, `merged`, or an LLM's `gguf_adapter`, `gguf_base`, `modelfile`, `merged_gguf`, `textgen`), `steps`, `memory` (`device`, `estimate_gb`, `budget_gb`, `peak_gb` as `measured` (`VmHWM` or `max_memory_reserved`), `estimate_vs_peak`, on CUDA `peak_allocated_gb`) |
"""

from __future__ import annotations

EVENTS: dict[str, tuple[str, ...]] = {
    "memory_plan": ("device", "budget_gb", "estimate_gb", "parts", "settings", "changes", "next", "next_keeping_batch"),
    "buckets": ("histogram",),
    "cached": ("latents", "text"),
    "started": ("total", "step"),
    "progress": ("step", "total", "loss", "lr", "it_s", "eta_s"),
    "compiled": ("warmup_s",),
    "checkpoint": ("step", "path", "state"),
    "sample": ("step", "paths", "texts"),
    "evaluation": ("step", "scores", "paths", "final"),
    "verdict": ("step", "verdict", "title", "message", "checkpoint"),
    "finished": ("outputs", "steps", "memory"),
}

# Numbers an evaluation may add to a `checkpoint` event (and to TensorBoard as eval/<name>).
METRICS: dict[str, str] = {
    "eval_loss": "mean loss on the held-out split (LLM: per answer token)",
    "perplexity": "exp(eval_loss) (LLM)",
    "pair_margin": "mean log p(chosen) - log p(rejected) on the held-out preference pairs (LLM dpo/orpo/kto)",
    "pair_accuracy": "fraction of the held-out preference pairs whose chosen answer is the likelier (LLM dpo/orpo/kto)",
}

# The evaluation's own scores (shared/evaluation), in the `evaluation` event and TensorBoard (eval/<name>).
SCORES: dict[str, str] = {
    "effect": "image tasks: how far the LoRA at weight 1 moves the pictures from the base's, relative to two base seeds",
    "collapse": "image tasks: the spread of the LoRA's pictures over different prompts, relative to the base's",
    "changed": "text tasks: the share of answer tokens that differ from the base's answers",
    "unstopped": "text tasks: the share of answers without an end-of-turn token within eval_max_tokens",
    "repeats": "text tasks: the mean share of repeated 4-token sequences in an answer",
    "identical": "text tasks: the share of prompts whose answer another prompt also got",
    "longest": "text tasks: the longest answer, in new tokens (an unstopped answer's length is the token limit)",
    "base_unstopped": "text tasks: unstopped, for the base model's answers",
    "base_repeats": "text tasks: repeats, for the base model's answers",
    "base_identical": "text tasks: identical, for the base model's answers",
}


def send(reporter, kind: str, **data) -> None:
    """Send one event after checking its fields against `EVENTS` (a mismatch is a bug in the loop)."""
    extra = set(data) - set(EVENTS[kind])
    if kind == "checkpoint":
        extra -= set(METRICS)
    missing = set(EVENTS[kind]) - set(data)
    if extra or missing:
        raise ValueError(f"event {kind}: unexpected fields {sorted(extra)}, missing {sorted(missing)}")
    reporter.event(kind, **data)
