"""Memory that plans itself: a job's peak memory estimated before it starts, the fastest settings that
fit `memory_budget`, and the estimate against the measured peak at the end.

What it counts is the device's own memory: on the CPU the process's resident memory (RSS; its peak is
the kernel's VmHWM), on CUDA the memory torch's allocator holds on the card (`max_memory_reserved`).

A task describes its part (`Task.memory_model`, shared/training/task.py) as data:

- `levers`: the settings it may change to save memory, each with its choices, the config's own value
  first and every later one leaner (gradient checkpointing, a smaller micro-batch with more
  accumulation, caches, an 8-bit optimizer, fp8 storage, swapped blocks, ...); each choice says how
  much slower (or faster) a step gets, and the lever says whether it changes the numbers trained;
- `estimate(settings)`: the bytes of each part of its peak (base weights, LoRA and optimizer state,
  activations, caches, ...) for the config with those settings;
- `hints`: per part, what to lower when that part does not fit;
- `imports`: the libraries the job will import, imported before the baseline is measured;
- `warm`: what the job builds once and keeps whatever the plan (a tokenizer's vocabulary), built
  before the baseline is measured so the baseline counts it.

The process baseline (interpreter, torch, those libraries, the runtime's own buffers) is measured
here at start-up, not guessed: the resident memory after importing them and running one small
forward and backward (CUDA: what torch has allocated before the model loads). The planner tries every
combination of the levers' choices, keeps those whose estimate fits the budget and picks the one
with the shortest estimated step time; the config's own settings come first whenever they fit, so a
job that fits runs exactly as configured. When nothing fits, the job is refused before anything
loads, with the budget, the estimate and what to lower.

Torch is imported only by the functions that measure; the planning itself is arithmetic.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

GiB = 2**30
AUTO_MARGIN = 0.10  # `auto` keeps 10% of what is free (at least MIN_MARGIN) for the rest of the system
MIN_MARGIN = GiB // 2
BUDGET_PATTERN = r"auto|off|[0-9]+(\.[0-9]+)?"
MMAP_THRESHOLD = 128 * 1024  # bytes; see lean_allocator
# oneDNN's primitive cache and ideep's (torch's CPU kernels) keep a JIT-compiled kernel for every matmul shape
KERNEL_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_DEFAULT = 1024  # both libraries' own capacity


@dataclass(frozen=True)
class Choice:
    """One value of a lever: the config keys it sets, and the step time relative to the config's own
    value (1.3: 30% slower; 0.8: faster)."""

    settings: Mapping[str, Any]
    time: float = 1.0
    label: str = ""


@dataclass(frozen=True)
class Lever:
    """A setting the planner may change to save memory. `choices` start with the config's own value;
    every later one uses less memory. `numerics` says how a choice other than the first trains
    differently ("" when it trains the same numbers); `resumable` is False where a training state saved
    with one choice cannot continue with another (its value is then kept when a job resumes)."""

    name: str
    choices: tuple[Choice, ...]
    numerics: str = ""
    resumable: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for c in self.choices for k in c.settings))


@dataclass
class MemoryModel:
    """A task's part of the estimate (see the module docstring). `estimate` gets the config's values of
    every lever key, with a plan's choices applied, and returns bytes by part."""

    levers: list[Lever]
    estimate: Callable[[Mapping[str, Any]], dict[str, float]]
    hints: dict[str, str] = field(default_factory=dict)
    imports: tuple[str, ...] = ()
    warm: Callable[[], None] | None = None


@dataclass
class Plan:
    """One combination of the levers' choices and what it is estimated to cost."""

    settings: dict[str, Any]  # every lever key -> its value in this plan
    parts: dict[str, float]  # bytes by part, the measured baseline included
    time: float  # estimated step time relative to the config's own settings
    labels: list[str] = field(default_factory=list)  # the choices that differ from the config

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(self.labels) or "the config's own settings"

    def summary(self) -> dict:
        """The plan as an event field: its settings, estimate (GB) and relative step time."""
        return {"settings": dict(self.settings), "estimate_gb": gb(self.total), "time": round(self.time, 3),
                "changes": list(self.labels)}


@dataclass
class MemoryPlan:
    """What the planner chose for a job, and what it would try next."""

    device: str  # cpu or cuda: what is counted (RSS or VRAM)
    budget: float | None  # bytes; None: `memory_budget: off` (estimate only)
    budget_text: str  # how the budget was found, for the log
    chosen: Plan
    changes: dict[str, Any]  # the chosen settings that differ from the config
    next: Plan | None = None  # the fastest plan that needs less memory than the chosen one
    next_keeping_batch: Plan | None = None  # the same among plans a saved state can continue
    numerics: list[str] = field(default_factory=list)  # how the chosen changes train differently
    estimated: bool = True  # False: the task gives no estimate (only the baseline is counted)

    def event(self) -> dict:
        """The `memory_plan` event's fields."""
        return {"device": self.device, "budget_gb": gb(self.budget) if self.budget is not None else None,
                "estimate_gb": gb(self.chosen.total), "parts": {k: gb(v) for k, v in self.chosen.parts.items()},
                "settings": dict(self.chosen.settings), "changes": dict(self.changes),
                "next": self.next.summary() if self.next else None,
                "next_keeping_batch": self.next_keeping_batch.summary() if self.next_keeping_batch else None}

    def log_line(self) -> str:
        if not self.estimated:
            return "Memory plan: this task gives no estimate; it runs as configured"
        parts = ", ".join(f"{k} {gb(v):.2f}" for k, v in self.chosen.parts.items() if v >= 0.005 * GiB)
        what = "RAM (peak RSS)" if self.device == "cpu" else "VRAM"
        budget = f"budget {self.budget_text}" if self.budget is not None else "memory_budget: off"
        line = (f"Memory plan: estimated peak {what} {gb(self.chosen.total):.2f} GB ({parts}); {budget}; "
                f"{self.chosen.describe()}")
        return line + "".join(f"; note: {n}" for n in self.numerics)


def gb(value: float) -> float:
    """Bytes as GB (2**30 bytes, the unit nvidia-smi and task managers show), to the MB."""
    return round(value / GiB, 3)


# --- the budget ------------------------------------------------------------------------------------

def parse_budget(text: str | float | int | None) -> float | str | None:
    """`memory_budget` as bytes, "auto", or None for "off"."""
    text = "auto" if text is None else str(text).strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return "auto"
    if not re.fullmatch(BUDGET_PATTERN, text):  # the schema's pattern refuses it before here
        raise ConfigError(f"memory_budget: {text!r} is not auto, off or a number of GB")
    return float(text) * GiB


def available(device: str, baseline: float) -> tuple[float, str]:
    """What `auto` may use, in bytes, and how it was found. CUDA: the card's free memory; the CPU:
    MemAvailable plus what this process already holds (the estimate counts it); either minus 10%."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        room, source = free + baseline, f"{gb(free):.1f} GB free on the card"
    else:
        mem = meminfo().get("MemAvailable")
        if mem is None:  # not Linux: nothing to plan against
            return math.inf, "unknown (no /proc/meminfo)"
        room, source = mem + baseline, f"{gb(mem):.1f} GB available RAM + {gb(baseline):.1f} GB this process holds"
    usable = room - max(AUTO_MARGIN * room, MIN_MARGIN)
    return usable, f"auto {gb(usable):.2f} GB ({source}, minus {AUTO_MARGIN:.0%})"


def meminfo() -> dict[str, float]:
    """/proc/meminfo in bytes ({} where there is none)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * 1024
    return out


# --- measuring -------------------------------------------------------------------------------------

def proc_status(key: str) -> float | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def lean_allocator() -> bool:
    """Give every freed tensor of 128 KiB or more back to the system at once (Linux, glibc).

    glibc serves big blocks with mmap, but after one is freed it raises that threshold (up to 32 MiB)
    and serves later blocks from its heap, whose freed middle it keeps: a run whose batches change shape
    then peaks above its live tensors. A fixed threshold keeps the resident memory at what the live
    tensors hold, at the price of a page fault for every page of every large tensor, every step (the
    53 M LLaMA benchmark: 15% lower peak, 1.8x the step time, so the LLM task keeps glibc's default and
    estimates its heap instead; Flux, not measured at size on this CPU, keeps the fixed threshold)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # malloc.h; setting it also stops the dynamic adjustment
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def cap_kernel_caches(entries: int) -> bool:
    """Keep at most `entries` compiled CPU kernels in each of oneDNN's and ideep's caches (LRU).

    Both caches hold a JIT-compiled kernel (and its scratch) for every matmul shape they have seen, 1024
    of them by default, 1.2-1.5 MiB a bf16 matmul's (measured on AVX512-BF16 and AMX): a job whose
    batches change width step by step (LLM rows of varied length) grows by the kernels of every new
    width (measured: the 53 M LLaMA benchmark, 24 steps, +290 MiB over its run). Both libraries read the capacity once, when the first kernel is made,
    so this takes effect in a process that has not run a CPU matmul yet (the daemon's worker, the CLI)
    and changes nothing afterwards; a capacity the environment already sets is kept. True when set."""
    import os

    if any(name in os.environ for name in KERNEL_CACHE_ENV):
        return False
    for name in KERNEL_CACHE_ENV:
        os.environ[name] = str(entries)
    return True


def kernel_cache_capacity() -> int:
    """How many compiled kernels oneDNN's cache keeps in this process: the environment's capacity
    (`cap_kernel_caches`'s, or the user's own), else the library's default."""
    import os

    value = os.environ.get(KERNEL_CACHE_ENV[0], "")
    return int(value) if value.isdigit() else KERNEL_CACHE_DEFAULT


def measure_baseline(device: str, imports: tuple[str, ...] = ()) -> float:
    """The process's own memory before the model loads: after importing `imports` and one small
    forward and backward (which sets up autograd's and the kernels' buffers). CPU: VmRSS; CUDA: what
    torch has allocated on the card."""
    import importlib

    import torch

    for name in imports:
        importlib.import_module(name)
    _warm_up(torch, device)
    if device == "cuda":
        return float(torch.cuda.memory_allocated())
    rss = proc_status("VmRSS")
    return float(rss) if rss is not None else 0.0


def _warm_up(torch, device: str) -> None:
    """A tiny training step through the common layer kinds (linear, conv, norm, attention, AdamW)."""
    import torch.nn.functional as F

    dev = "cuda" if device == "cuda" else "cpu"
    x = torch.randn(2, 8, 16, 16, device=dev)
    conv = torch.randn(8, 8, 3, 3, device=dev, requires_grad=True)
    lin = torch.randn(8, 8, device=dev, requires_grad=True)
    h = F.group_norm(F.conv2d(x, conv, padding=1), 4).flatten(2).transpose(1, 2)
    h = F.layer_norm(h @ lin, (8,))
    q = h.reshape(2, 256, 2, 4).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, q)
    out.float().square().mean().backward()
    optimizer = torch.optim.AdamW([conv, lin])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reset_peak(device: str) -> None:
    """Start the peak counter now (CUDA; on the CPU VmHWM counts from the process's start)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def measured_peak(device: str) -> dict[str, float]:
    """The peak so far: CPU {"rss": VmHWM}; CUDA {"reserved", "allocated"} (torch's allocator)."""
    if device == "cuda":
        import torch

        return {"reserved": float(torch.cuda.max_memory_reserved()),
                "allocated": float(torch.cuda.max_memory_allocated())}
    peak = proc_status("VmHWM")
    return {"rss": float(peak)} if peak is not None else {}


def compare(plan: MemoryPlan) -> dict:
    """The estimate beside the measured peak: the `memory` field of the `finished` event and result."""
    measured = measured_peak(plan.device)
    peak = measured.get("rss", measured.get("reserved"))
    out = {"device": plan.device, "estimate_gb": gb(plan.chosen.total),
           "budget_gb": gb(plan.budget) if plan.budget is not None else None,
           "peak_gb": gb(peak) if peak else None, "measured": "VmHWM" if plan.device == "cpu" else "max_memory_reserved",
           "estimate_vs_peak": round(plan.chosen.total / peak - 1, 3) if peak else None}
    if "allocated" in measured:
        out["peak_allocated_gb"] = gb(measured["allocated"])
    return out


def comparison_line(memory: dict) -> str:
    if memory.get("peak_gb") is None:
        return f"Memory: estimated {memory['estimate_gb']:.2f} GB; the peak could not be measured here"
    return (f"Memory: estimated {memory['estimate_gb']:.2f} GB, measured peak {memory['peak_gb']:.2f} GB "
            f"({memory['measured']}; estimate {memory['estimate_vs_peak']:+.0%})")


# --- the loop's one call -------------------------------------------------------------------------

def plan_memory(cfg, task, precision, resume_from: Path | None = None, agree: Callable | None = None):
    """Before the model loads: measure the baseline, plan, and return (the config with the plan's
    settings, the MemoryPlan). ConfigError when even the cheapest plan does not fit. `agree` hands
    every rank the main process's plan (their budgets may differ; their batches must not)."""
    device = device_kind(precision.device)
    if task.lean_allocator:
        lean_allocator()
    if task.kernel_cache is not None and device == "cpu":
        cap_kernel_caches(task.kernel_cache)
    model = task.memory_model(precision)
    estimated = model is not None
    model = model or MemoryModel(levers=[], estimate=lambda settings: {})
    if model.warm is not None:
        model.warm()
    baseline = measure_baseline(device, model.imports)
    values = {k: getattr(cfg, k) for lever in model.levers for k in lever.keys}
    plan = plan_job(model, values, device=device, budget=parse_budget(cfg.memory_budget), baseline=baseline,
                    pinned=resumed_settings(resume_from, model, values))
    plan.estimated = estimated
    if agree is not None:
        plan = agree(plan)
    reset_peak(device)
    return dataclasses.replace(cfg, **plan.changes), plan


# --- planning --------------------------------------------------------------------------------------

def enumerate_plans(model: MemoryModel, values: Mapping[str, Any], baseline: float,
                    pinned: Mapping[str, Any] | None = None, limit: int = 20_000) -> list[Plan]:
    """Every combination of the levers' choices with its estimate. `values`: the config's value of
    every lever key; `pinned`: keys whose value is fixed (a resumed state's micro-batch), so only the
    choices that keep them are tried."""
    pinned = pinned or {}
    levers = []
    for lever in model.levers:
        choices = list(lever.choices)
        if any(k in pinned for k in lever.keys):
            keep = [c for c in choices if all(c.settings.get(k, values.get(k)) == pinned[k]
                                              for k in lever.keys if k in pinned)]
            choices = keep or [Choice({k: pinned[k] for k in lever.keys if k in pinned})]
        levers.append((lever, choices))
    plans = []
    for combo in itertools.islice(itertools.product(*(choices for _, choices in levers)), limit):
        settings = {k: values.get(k) for lever, _ in levers for k in lever.keys}
        time, labels = 1.0, []
        for (lever, _choices), choice in zip(levers, combo):
            settings.update(choice.settings)
            time *= choice.time
            if choice is not lever.choices[0] and choice.label:
                labels.append(choice.label)
        parts = {"baseline": baseline, **model.estimate({**values, **settings})}
        plans.append(Plan(settings, parts, time, labels))
    return plans


def choose(plans: list[Plan], budget: float | None) -> Plan | None:
    """The config's own plan when it fits (or when there is no budget), else the fastest that fits
    (the leaner on a tie); None when none fits."""
    if not plans:
        return None
    own = plans[0]  # every lever's first choice: the config as written
    if budget is None or own.total <= budget:
        return own
    fitting = [p for p in plans if p.total <= budget]
    return min(fitting, key=lambda p: (p.time, p.total)) if fitting else None


def cheaper(plans: list[Plan], than: Plan, keep: Mapping[str, Any] | None = None) -> Plan | None:
    """The fastest plan estimated to need less memory than `than` (by at least 1 MiB), among those
    that keep the `keep` settings."""
    keep = keep or {}
    candidates = [p for p in plans if p.total < than.total - 2**20
                  and all(p.settings.get(k) == v for k, v in keep.items())]
    return min(candidates, key=lambda p: (p.time, p.total)) if candidates else None


def plan_job(model: MemoryModel, values: Mapping[str, Any], *, device: str, budget: float | str | None,
             baseline: float, pinned: Mapping[str, Any] | None = None) -> MemoryPlan:
    """Choose the plan for a job (see the module docstring); ConfigError naming the budget, the
    cheapest estimate and what to lower when nothing fits."""
    plans = enumerate_plans(model, values, baseline, pinned)
    if budget == "auto":
        budget, budget_text = available(device, baseline)
    elif budget is None:
        budget_text = "off"
    else:
        budget_text = f"{gb(budget):g} GB (memory_budget)"
    chosen = choose(plans, budget)
    if chosen is None:
        cheapest = min(plans, key=lambda p: p.total)
        raise ConfigError(refusal(budget, budget_text, cheapest, model.hints))
    levers_by_key = {k: lever for lever in model.levers for k in lever.keys}
    changes = {k: v for k, v in chosen.settings.items() if v != values.get(k)}
    fixed = {k: chosen.settings[k] for k, lever in levers_by_key.items() if not lever.resumable}
    numerics = list(dict.fromkeys(levers_by_key[k].numerics for k in changes if levers_by_key[k].numerics))
    return MemoryPlan(device=device, budget=budget, budget_text=budget_text, chosen=chosen, changes=changes,
                      next=cheaper(plans, chosen), next_keeping_batch=cheaper(plans, chosen, fixed),
                      numerics=numerics)


def refusal(budget: float, budget_text: str, cheapest: Plan, hints: Mapping[str, str]) -> str:
    """One line: the budget, the cheapest plan's estimate and what to lower."""
    parts = {k: v for k, v in cheapest.parts.items() if k != "baseline"}
    biggest = max(parts, key=parts.get) if parts else "baseline"
    hint = hints.get(biggest, "batch_size")
    shown = ", ".join(f"{k} {gb(v):.2f}" for k, v in sorted(cheapest.parts.items(), key=lambda kv: -kv[1])
                      if v >= 0.005 * GiB)
    return (f"memory_budget: the cheapest plan ({cheapest.describe()}) needs an estimated {gb(cheapest.total):.2f} GB "
            f"({shown}), more than the budget of {budget_text}; lower {hint}, or raise memory_budget")


def resumed_settings(resume_from: Path | None, model: MemoryModel, values: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The settings a resumed state fixes: the values of the levers a state cannot change, as its
    fingerprint recorded them (the micro-batch and accumulation a planner may have chosen then); one
    the fingerprint does not record (the optimizer) keeps the config's value from `values`."""
    if resume_from is None:
        return {}
    import json

    try:
        fingerprint = json.loads((Path(resume_from) / "trainer.json").read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    keys = {k for lever in model.levers if not lever.resumable for k in lever.keys}
    values = values or {}
    return {k: fingerprint[k] if k in fingerprint else values[k] for k in keys if k in fingerprint or k in values}


# --- levers every task can offer ---------------------------------------------------------------------

def checkpointing_lever(cfg, time: float = 4 / 3) -> Lever:
    """Gradient checkpointing: each block's forward runs again in the backward (about a third more
    compute), its activations are not kept. Trains the same numbers (the dropout masks are replayed)."""
    if cfg.gradient_checkpointing:
        return Lever("gradient_checkpointing", (Choice({"gradient_checkpointing": True}),))
    return Lever("gradient_checkpointing", (Choice({"gradient_checkpointing": False}),
                                            Choice({"gradient_checkpointing": True}, time, "gradient checkpointing")))


def micro_batch_lever(cfg, device: str) -> Lever:
    """A smaller micro-batch with more accumulation, keeping the effective batch (batch_size x
    gradient_accumulation_steps). Smaller batches use the device less well: on a GPU each halving is
    estimated at 10% more time per sample, on the CPU at 2%."""
    batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    per_halving = 1.10 if device == "cuda" else 1.02
    choices = []
    for size in (d for d in range(batch, 0, -1) if batch % d == 0):
        slower = per_halving ** math.log2(batch / size)
        label = f"batch_size {size} x gradient_accumulation_steps {accum * batch // size}"
        choices.append(Choice({"batch_size": size, "gradient_accumulation_steps": accum * batch // size},
                              slower, label))
    return Lever("micro_batch", tuple(choices), resumable=False,
                 numerics="the same effective batch in smaller micro-batches: the loss is averaged per micro-batch "
                          "(LLM: tokens weigh by micro-batch) and the SD batches are drawn in other groups")


def eight_bit_lever(cfg, device: str) -> Lever | None:
    """The 8-bit AdamW of bitsandbytes (CUDA only): optimizer state in 2 bytes per weight instead of 8."""
    if getattr(cfg, "optimizer", None) != "adamw" or device != "cuda":
        return None
    return Lever("optimizer", (Choice({"optimizer": "adamw"}), Choice({"optimizer": "adamw8bit"}, 1.02, "adamw8bit")),
                 resumable=False, numerics="adamw8bit keeps the optimizer state quantised to 8 bits")


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype (or its name)."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1,
            "float8_e5m2": 1, "int8": 1, "uint8": 1}.get(name, 4)


def device_kind(device) -> str:
    """cuda or cpu: which memory a plan counts (other accelerators are planned as the CPU is)."""
    return "cuda" if getattr(device, "type", str(device)).startswith("cuda") else "cpu"


def adam_bytes(optimizer: str) -> int:
    """Optimizer state per trained weight: AdamW keeps two fp32 moments, the 8-bit one two bytes."""
    return 2 if optimizer == "adamw8bit" else 8


def trainable_bytes(params: int, optimizer: str = "adamw", grads: bool = True) -> float:
    """The LoRA weights (fp32), their gradients and the optimizer's state."""
    return params * (4 + (4 if grads else 0) + adam_bytes(optimizer))


