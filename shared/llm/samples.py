"""Sample generations during LLM training: fixed prompts answered greedily, into the log and samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from shared.llm.data import LLMData
from shared.llm.generate import greedy
from shared.training.task import Samples


class SampleWriter:
    """Answers to fixed prompts at a step: a log line each and rows in `<log_dir>/samples.jsonl`."""

    def __init__(self, prompts: list[tuple[str, list[int]]], tokenizer, max_tokens: int, use_cache: bool, reporter):
        self.prompts, self.tokenizer, self.reporter = prompts, tokenizer, reporter
        self.max_tokens, self.use_cache = max_tokens, use_cache
        self.last_step: int | None = None

    def run(self, model, step: int, log_dir: Path) -> Samples | None:
        if not self.prompts or step == self.last_step:  # once per step (a checkpoint and the cadence may meet)
            return None
        self.last_step = step
        was_training = model.training
        model.eval()
        rows = []
        for shown, ids in self.prompts:
            gen = greedy(model, self.tokenizer, ids, self.max_tokens, use_cache=self.use_cache)
            note = "" if gen.stopped else f" [no EOS within {self.max_tokens} tokens]"
            self.reporter.log(f"Sample at step {step}: {shown!r} -> {gen.text!r}{note}")
            rows.append({"step": step, "prompt": shown, "output": gen.text, "stopped": gen.stopped})
        model.train(was_training)
        path = log_dir / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        return Samples(paths=[path], prompts=[r["prompt"] for r in rows], texts=[r["output"] for r in rows])


def sample_prompts(cfg, data: LLMData, tokenizer) -> list[tuple[str, list[int]]]:
    """(shown text, token ids) for each sample prompt: the config's, else up to 3 from the data."""
    return prompt_ids(cfg.sample_prompts, data, tokenizer, 3)


def prompt_ids(given: list[str] | None, data: LLMData, tokenizer, count: int) -> list[tuple[str, list[int]]]:
    """(shown text, token ids) for each of `given`, rendered as the training data was; without any, up
    to `count` prompts from the data: the held-out samples' first, then the training samples'."""
    renderer = data.renderer
    if given:
        return [(p, renderer.prompt_ids(p, as_chat=data.uses_template)) for p in given]
    out: list[tuple[str, list[int]]] = []
    for s in data.val + data.unpacked_train:
        if s.prompt_text and len(out) < count:
            ids = renderer.rendered_prompt_ids(s.prompt_text, as_chat=data.uses_template)
            shown = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if shown not in dict(out):
                out.append((shown, ids))
    return out
