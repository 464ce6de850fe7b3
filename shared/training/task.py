"""What a model family supplies to the training loop, and the registry that finds it.

The loop (shared/train.py) owns what every job shares: device and precision, optimizer and
schedule, gradient accumulation, clipping, events and logs, stop, save cadence, keep-last-N,
sample cadence, resumable states, publishing. A task owns what differs between model families:

- `load(precision)`: load the base model, build the data, inject the adapters (the base frozen);
- `epoch_batches(epoch, size)`: the epoch's micro-batches of `size` items (the global batch of all
  processes), the same on every rank and in every run with the same seed;
- `loss(items, modules)`: the summed loss of `items` and the count that normalises it;
- `param_groups()`, `train_modules()`, `trainable()`: what the optimizer trains, which modules
  the ranks' data-parallel wrappers hold, and the named tensors a state saves;
- `write_adapter(path, name, progress, final)` and `adapter_suffix`: the adapter in the format the
  hosts load (a file, or a folder when the suffix is empty);
- optional: `memory_model` (its part of the memory plan, shared/training/memory.py), `histogram`, `build_caches`, `fingerprint`, `evaluate`, `sample`, `step_scalars`,
  `finish`, `exports`, `usage`;
- optional, for the evaluation of the finished LoRA (shared/evaluation): `eval_prompts`, and `render`
  (image tasks: pictures at fixed seeds with the adapter at a weight, 0 being the base) or `answer`
  (text tasks: greedy answers with the adapter off or on), and `data_summary` for the report. The
  scores and verdicts are computed from what these return, the same way for every family: a new
  image task implements `render` and gets the effect and collapse checks.

A task never sends events itself: the loop sends every event from what these methods return, so
every task's event stream has the same kinds and fields (shared/training/events.py).

The registry names each task's module as a string: a job imports its own family's code and nothing
of the others (an LLM job never imports shared.sd, and the reverse).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from shared.errors import ConfigError

TASKS = {
    "sd": "shared.sd.task:SDTask",
    "flux": "shared.flux.task:FluxTask",
    "llm": "shared.llm.task:LLMTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered under `name`; imports that family's module only now."""
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r}; use {' or '.join(TASKS)}")
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Precision:
    """Where and in which types the task keeps and runs its model (shared/training/precision.py)."""

    device: Any  # torch.device
    weight_dtype: Any  # torch.dtype the frozen base weights are stored in
    mixed_precision: str  # no, fp16, bf16
    autocast: Callable[[], Any]  # a context manager: the forward passes of a training step run in it


@dataclass
class Progress:
    """Where a run is: what a state records besides tensors, and what an export names."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # the next micro-batch of `epoch`
    losses: list[float] = field(default_factory=list)
    started_at: float = 0.0  # unix time of the run's first start (kept across resumes)
    total: int = 0
    steps_per_epoch: int = 1


@dataclass
class Samples:
    """What `sample` (or an evaluation) made for people to look at."""

    paths: list[Path]
    prompts: list[str]
    texts: list[str] = field(default_factory=list)  # generated text, one per prompt (text tasks)
    images: list = field(default_factory=list)  # PIL images, one per prompt (image tasks)


@dataclass
class Evaluation:
    """A task's judgement of the adapter at a step: numbers (`METRICS` in events.py) and samples."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: Samples | None = None


@dataclass
class Finish:
    """What a task adds to its published adapter: sidecar writers (suffix -> writer(path, name)) and
    other files it wrote (output name -> path, e.g. the SD before/after grid)."""

    sidecars: dict[str, Callable[[Path, str], None]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)


class Task:
    """One model family's part of a training job. See the module docstring for the contract."""

    name: ClassVar[str]
    adapter_suffix: ClassVar[str]  # ".safetensors": the adapter is one file; "": a folder
    # whether the loop fixes glibc's mmap threshold (shared/training/memory.py `lean_allocator`): for
    # batches whose shapes change step to step; it costs a page fault for every large tensor
    lean_allocator: ClassVar[bool] = True
    # on the CPU, how many compiled matmul kernels torch's oneDNN keeps (shared/training/memory.py
    # `cap_kernel_caches`); None: the libraries' own 1024, for jobs whose shapes repeat step to step
    kernel_cache: ClassVar[int | None] = None

    def __init__(self, cfg, reporter) -> None:
        self.cfg = cfg
        self.reporter = reporter

    # --- set-up --------------------------------------------------------------------------------
    def memory_model(self, precision: Precision):
        """This task's part of the memory plan (a `shared.training.memory.MemoryModel`: the levers it
        offers, the estimate of its peak by part, what to lower), read from the model's header and
        config files without loading weights. Called before `load`; it may keep what `load` reuses
        (e.g. the tokenized data), but nothing that depends on a lever's setting. None: no estimate,
        the job runs as configured."""
        return None

    def load(self, precision: Precision) -> None:
        """Load the model, build the data, inject the adapters. Refuse bad input here (nothing has
        been written yet)."""
        raise NotImplementedError

    def histogram(self) -> dict[str, int]:
        """Training items per size bucket (the `buckets` event)."""
        return {}

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: `params` and `lr` each."""
        raise NotImplementedError

    def train_modules(self) -> list:
        """The modules whose forward `loss` calls through their data-parallel wrappers (the loop
        prepares them). Trainable parameters outside them get their gradients averaged by the loop."""
        raise NotImplementedError

    def trainable(self) -> dict[str, Any]:
        """The trained tensors by a stable name: what a state saves and a resume copies back."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Settings beyond the loop's own that a state must have been trained with to be resumed."""
        return {}

    def build_caches(self) -> dict[str, bool]:
        """Precompute what steps would otherwise recompute (runs once, main process first)."""
        return {"latents": False, "text": False}

    # --- a step --------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, size: int) -> list[list]:
        raise NotImplementedError

    def loss(self, items: list, modules: list):
        """(sum of the items' losses, count): the loop divides by the count over all ranks."""
        raise NotImplementedError

    # --- looking at it ---------------------------------------------------------------------------
    def evaluate(self, step: int, log_dir: Path) -> Evaluation:
        """At each checkpoint and at the end (main process only)."""
        return Evaluation()

    def sample(self, step: int, log_dir: Path) -> Samples | None:
        """Every `sample_every_n_steps` (main process only); None when there is nothing to sample."""
        return None

    def step_scalars(self) -> dict[str, float]:
        """After each optimizer step (every process): numbers the task measured over the step's
        micro-batches, for TensorBoard as train/<name> (the main process's; e.g. a preference
        objective's margin and accuracy)."""
        return {}

    # --- the evaluation's hooks (shared/evaluation) --------------------------------------------
    def eval_prompts(self) -> list[str]:
        """The prompts every evaluation of this job uses (the same ones each time): `eval_prompts`,
        else the first `eval_prompt_count` sample prompts. A family adds its own fallback (SD:
        training captions and an unrelated prompt; LLM: held-out prompts)."""
        cfg = self.cfg
        return list(cfg.eval_prompts or (cfg.sample_prompts or [])[: cfg.eval_prompt_count])

    def render(self, prompts: list[str], seeds: list[int], weight: float) -> list | None:
        """Image tasks: one PIL image per (prompt, seed) pair with the adapter at `weight` (0: the base
        model alone), the same pixels for the same arguments. None: this task makes no images."""
        return None

    def answer(self, prompts: list[str], weight: float) -> list | None:
        """Text tasks: the greedy answer to each prompt with the adapter at `weight` (0: off, 1: on),
        each an object with `text`, `token_ids` and `stopped` (it ended with an end-of-turn token within
        the limit). None: this task writes no text."""
        return None

    def data_summary(self) -> dict[str, Any]:
        """What the report says about the training data beside the size histogram (counts, examples)."""
        return {}

    # --- output --------------------------------------------------------------------------------
    def write_adapter(self, path: Path, name: str, progress: Progress, final: bool) -> None:
        """Write the adapter to `path` (a file, or a folder that exists and is empty), named `name`."""
        raise NotImplementedError

    def finish(self, output_dir: Path, progress: Progress) -> Finish:
        """After the last step, before publishing (main process only)."""
        return Finish()

    def exports(self, published: Path, output_dir: Path) -> dict[str, Path]:
        """Further outputs made from the published adapter (e.g. a merged model)."""
        return {}

    def usage(self, published: Path) -> str:
        """How to use the published adapter, appended to the log line that names it."""
        return ""
