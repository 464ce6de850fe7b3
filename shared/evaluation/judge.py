"""The evaluation of one job, as the training loop calls it: at checkpoints and at the end, the task's own
`evaluate` (eval loss, samples), then pictures or answers from the task's hooks, their scores, the
verdicts, the best checkpoint, the notes for the sidecar and the report.

The loop calls four things (shared/train.py):

    judge = Judge(cfg, task, output_dir)
    judged = judge.evaluate(step, log_dir, checkpoint=path)   # at a checkpoint; without one at the end
    finish = judge.annotate(task.finish(...))                  # the verdicts in the .json sidecar's notes
    outputs["report"] = judge.conclude(result, outputs, progress)  # report.html / report.json, the result

and `judge.keep_steps()` tells keep-last-N which checkpoint to spare (the best one). The judge never
sends events: `judged.events` are (kind, fields) pairs the loop sends.

Which evaluation a task gets follows from the hooks it implements (shared/training/task.py): `render`
(an image task: SD, Flux) or `answer` (a text task: LLMs). The base model's pictures or answers are
made once per job (the base never changes); each evaluation then makes the adapter's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.evaluation import images as image_scores
from shared.evaluation import texts as text_scores
from shared.evaluation.verdicts import Verdict, judge
from shared.files import atomic_write
from shared.schema.evaluation import eval_weights
from shared.training.task import Evaluation, Task

OTHER_SEED = 1000  # the base's second picture of each prompt is at seed + OTHER_SEED (the effect's yardstick)
GRID_CELL = 256  # px: the evaluation grids (for the report and the tab) keep pictures at most this big


@dataclass
class Record:
    """One evaluation: what the task measured, our scores, and what was made to look at."""

    step: int
    checkpoint: str  # the loadable adapter of this step ("" at the end: the published one)
    final: bool
    metrics: dict[str, float] = field(default_factory=dict)  # the task's (eval_loss, perplexity)
    scores: dict[str, Any] = field(default_factory=dict)  # ours (images.py, texts.py)
    columns: list[str] = field(default_factory=list)  # image tasks: the grid's columns
    grid: str = ""  # image tasks: the grid of this evaluation (PNG)
    preview: str = ""  # image tasks: the first prompt at the weight nearest preferred_weight (PNG)
    answers: list[dict] = field(default_factory=list)  # text tasks: prompt, before, after, flags
    verdicts: list[str] = field(default_factory=list)  # the kinds that held after it
    seconds: float = 0.0


@dataclass
class Judged:
    evaluation: Evaluation  # the task's own (its metrics go into the checkpoint event)
    scores: dict[str, Any]
    events: list[tuple[str, dict]]

    @property
    def metrics(self) -> dict[str, float]:
        """The task's metrics and our numeric scores: what TensorBoard logs as eval/<name>."""
        return {**self.evaluation.metrics, **{k: v for k, v in self.scores.items() if isinstance(v, (int, float))}}


def _overrides(task: Task, hook: str) -> bool:
    return getattr(type(task), hook) is not getattr(Task, hook)


class Judge:
    def __init__(self, cfg, task: Task, output_dir: Path):
        self.cfg, self.task = cfg, task
        self.folder = Path(output_dir) / "evaluation"
        self.started = time.time()
        self.seconds = 0.0  # inside evaluate(): the evaluation's share of the job's time
        self.records: list[Record] = []
        self.verdicts: list[Verdict] = []  # those that held after the latest evaluation
        self.sent: set[str] = set()
        self.kind = "image" if _overrides(task, "render") else "text" if _overrides(task, "answer") else None
        self.prompts: list[str] | None = None
        self.base: Any = None  # the base model's pictures (two seeds) or answers, made once
        self.checkpoints = 0

    # --- at a checkpoint and at the end ----------------------------------------------------------
    def evaluate(self, step: int, log_dir: Path, checkpoint: Path | None = None) -> Judged:
        """The task's `evaluate`, then (when due) our scores and verdicts. `checkpoint`: the adapter
        saved at this step; None for the final evaluation."""
        import torch

        started = time.perf_counter()
        final = checkpoint is None
        self.checkpoints += not final
        every = self.cfg.eval_every_n_checkpoints
        due = self.cfg.evaluation and self.kind and (final or (every and self.checkpoints % every == 0))
        # the global RNG (dropout masks) must not notice: a resumed run has to continue where this one is
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            evaluation = self.task.evaluate(step, log_dir)
            record = Record(step, str(checkpoint or ""), final, metrics=dict(evaluation.metrics))
            if due:
                self._images(record) if self.kind == "image" else self._answers(record)
        self.records.append(record)
        self.verdicts = judge(self.cfg, self.records, final, self._recommend())
        record.verdicts = [v.kind for v in self.verdicts]
        record.seconds = time.perf_counter() - started
        self.seconds += record.seconds
        scores = {**record.metrics, **{k: v for k, v in record.scores.items() if v is not None}}
        events = []
        if scores:
            events.append(("evaluation", {"step": step, "scores": scores, "final": final,
                                          "paths": [p for p in (record.grid, record.preview) if p]}))
        for verdict in self.verdicts:
            if verdict.kind not in self.sent:  # each verdict once, when first found
                self.sent.add(verdict.kind)
                events.append(("verdict", verdict.as_dict()))
        return Judged(evaluation, scores, events)

    def _images(self, record: Record) -> None:
        task, cfg = self.task, self.cfg
        prompts = self._prompts()
        if not prompts:  # nothing to render: no scores
            return
        # every prompt at the same seed: the pictures of different prompts then differ by the prompt alone
        seeds, others = [cfg.seed] * len(prompts), [cfg.seed + OTHER_SEED] * len(prompts)
        if self.base is None:
            self.base = (task.render(prompts, seeds, 0.0), task.render(prompts, others, 0.0))
        base, base_other = self.base
        weights = eval_weights(getattr(cfg, "eval_weights", "1"))
        made = {w: task.render(prompts, seeds, w) for w in weights}
        record.scores = {"effect": image_scores.effect_score(made[1.0], base, base_other),
                         "collapse": image_scores.collapse_score(made[1.0], base)}
        record.columns = ["base", *(f"LoRA {w:g}" for w in weights)]
        rows = [[base[i], *(made[w][i] for w in weights)] for i in range(len(prompts))]
        name = f"step{record.step:06d}"
        picture = image_scores.grid(rows, record.columns, GRID_CELL)
        record.grid = str(atomic_write(self.folder / f"{name}.png", lambda p: picture.save(p, format="PNG")))
        preferred = min(weights, key=lambda w: abs(w - getattr(cfg, "preferred_weight", 1.0)))
        record.preview = str(atomic_write(self.folder / f"{name}-preview.png",
                                          lambda p: made[preferred][0].save(p, format="PNG")))

    def _answers(self, record: Record) -> None:
        prompts = self._prompts()
        if self.base is None:
            self.base = self.task.answer(prompts, 0)
        after = self.task.answer(prompts, 1)
        record.scores = text_scores.answer_scores(after, self.base)
        record.answers = [{"prompt": p, "before": b.text, "after": a.text, "stopped": a.stopped,
                           "before_stopped": b.stopped, "repeats": text_scores.repeated_share(a.token_ids)}
                          for p, b, a in zip(prompts, self.base, after)]

    def _prompts(self) -> list[str]:
        if self.prompts is None:
            self.prompts = list(self.task.eval_prompts())
        return self.prompts

    # --- the best checkpoint ---------------------------------------------------------------------
    def best(self) -> Record | None:
        """By eval loss where there is one; else the latest evaluation no collapse verdict came from."""
        with_loss = [r for r in self.records if "eval_loss" in r.metrics]
        if with_loss:
            return min(with_loss, key=lambda r: r.metrics["eval_loss"])
        healthy = [r for r in self.records if "collapse" not in r.verdicts]
        return (healthy or self.records or [None])[-1]

    def _recommend(self) -> str:
        """The checkpoint a collapse or overfitting verdict names: the best, unless that is the latest."""
        best = self.best()
        if best is None or best is self.records[-1] or not best.checkpoint:
            return ""
        return best.checkpoint

    def keep_steps(self) -> set[int]:
        """Checkpoints keep-last-N must not delete: the best one so far, where something chose it (the eval
        loss, or a collapse after it); "the latest" needs no sparing, and keep-last-N stays exact."""
        best = self.best()
        if best is None or not best.checkpoint:
            return set()
        chosen = "eval_loss" in best.metrics or best is not self.records[-1]
        return {best.step} if chosen else set()

    # --- the outputs -----------------------------------------------------------------------------
    def notes(self) -> str:
        """One paragraph for the LoRA's notes: the scores, the verdicts, the best checkpoint."""
        if not self.records:
            return ""
        last = self.records[-1]
        numbers = ", ".join(f"{k} {v:.3g}" for k, v in {**last.metrics, **last.scores}.items()
                            if isinstance(v, (int, float)) and not k.startswith("base_"))
        text = f"lora-daemon evaluation at step {last.step}" + (f": {numbers}" if numbers else "")
        if self.verdicts:
            text += ". Warnings: " + "; ".join(f"{v.title}: {v.message}" for v in self.verdicts)
        else:
            text += ". No problem found."
        best = self.best()
        if best is not None and best is not last and best.checkpoint:
            text += f" Best checkpoint: step {best.step} ({Path(best.checkpoint).name})."
        return text

    def annotate(self, finish):
        """The task's `.json` sidecar (the A1111/Forge card's notes) with our notes added to its own."""
        writer = finish.sidecars.get(".json")
        notes = self.notes()
        if writer is None or not notes:
            return finish

        def write(path, name):
            writer(path, name)
            card = json.loads(Path(path).read_text(encoding="utf-8"))
            card["notes"] = " ".join(filter(None, [str(card.get("notes") or "").rstrip(".") + ".", notes]))
            Path(path).write_text(json.dumps(card, indent=2), encoding="utf-8")

        finish.sidecars[".json"] = write
        return finish

    def conclude(self, result, outputs: dict, progress) -> Path:
        """Fill the result's verdicts and best checkpoint, write report.html and report.json into the
        output folder (under new names when taken), return the HTML's path."""
        from shared.evaluation.report import write_report

        best = self.best()
        result.verdicts = [v.as_dict() for v in self.verdicts]
        result.best_checkpoint = None if best is None else {
            "step": best.step, "path": best.checkpoint or str(result.output_path), "final": best.final,
            "eval_loss": best.metrics.get("eval_loss"), "by": "eval_loss" if "eval_loss" in best.metrics else
            ("last" if best is self.records[-1] else "last without collapse")}
        elapsed = max(time.time() - self.started, 1e-9)
        result.evaluation_seconds, result.job_seconds = self.seconds, elapsed
        data = self._report_data(result, outputs, progress, self.task.data_summary())
        result.report = write_report(Path(self.cfg.output_dir), data)
        return result.report

    def _report_data(self, result, outputs: dict, progress, summary: dict) -> dict:
        cfg = self.cfg
        return {
            "name": Path(result.output_path).stem if result.output_path else cfg.resolved_output_name,
            "task": self.task.name,
            "kind": self.kind,
            "steps": progress.step,
            "total": progress.total,
            "stopped_early": result.stopped_early,
            "started_at": progress.started_at,
            "finished_at": time.time(),
            "losses": list(progress.losses),
            "prompts": self.prompts or [],
            "evaluations": [vars(r) for r in self.records],
            "verdicts": result.verdicts,
            "best_checkpoint": result.best_checkpoint,
            "cost": {"evaluation_s": round(self.seconds, 3), "job_s": round(result.job_seconds, 3),
                     "share": self.seconds / result.job_seconds},
            "thresholds": {k: getattr(cfg, k) for k in ("verdict_min_effect", "verdict_collapse",
                                                         "verdict_identical_answers", "verdict_rising_checkpoints",
                                                         "verdict_never_stops", "verdict_repeats")},
            "data": {"histogram": self.task.histogram(), **summary},
            "outputs": {k: str(v) for k, v in outputs.items() if v},
            "config": cfg.to_dict(),
        }
