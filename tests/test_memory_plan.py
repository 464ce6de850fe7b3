"""The memory planner (shared/training/memory.py) on synthetic levers: the config's own settings when
they fit, else the fastest plan that fits; a clear refusal when nothing fits; the next cheaper plan; a
resumed state's micro-batch kept."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.training.memory import (
    Choice,
    GiB,
    Lever,
    MemoryModel,
    cheaper,
    enumerate_plans,
    parse_budget,
    plan_job,
)


def synthetic() -> MemoryModel:
    """Two levers: checkpointing (1.3x slower, activations / 4) and halving the micro-batch (1.05x
    slower, activations / 2). With the 1 GB baseline the plans need: own 10 GB, halved 6, checkpointed
    4, both 3."""
    levers = [
        Lever("gradient_checkpointing", (Choice({"gradient_checkpointing": False}),
                                         Choice({"gradient_checkpointing": True}, 1.3, "checkpointing"))),
        Lever("micro_batch", (Choice({"batch_size": 4, "gradient_accumulation_steps": 1}),
                              Choice({"batch_size": 2, "gradient_accumulation_steps": 2}, 1.05, "batch 2 x 2")),
              resumable=False, numerics="smaller micro-batches"),
    ]

    def estimate(s):
        activations = 8 * GiB * s["batch_size"] / 4 / (4 if s["gradient_checkpointing"] else 1)
        return {"weights": GiB / 2, "activations": activations, "trainable": GiB / 2}

    return MemoryModel(levers=levers, estimate=estimate, hints={"activations": "resolution or batch_size"})


VALUES = {"gradient_checkpointing": False, "batch_size": 4, "gradient_accumulation_steps": 1}


def plan(budget_gb, **kw):
    return plan_job(synthetic(), VALUES, device="cpu", budget=budget_gb * GiB if budget_gb else None,
                    baseline=1 * GiB, **kw)


def test_the_config_runs_as_written_when_it_fits():
    chosen = plan(20)
    assert chosen.changes == {} and chosen.chosen.total == 10 * GiB
    assert plan(None).changes == {}  # memory_budget: off estimates only


def test_a_budget_between_two_plans_picks_the_faster_one_that_fits():
    # 6.5 GB: the halved batch (6 GB, 1.05x) and checkpointing (4 GB, 1.3x) both fit; halving is faster
    chosen = plan(6.5)
    assert chosen.changes == {"batch_size": 2, "gradient_accumulation_steps": 2}
    assert chosen.numerics == ["smaller micro-batches"]
    # 5 GB: only the checkpointed plans fit; the faster of them is checkpointing alone (1.3x vs 1.365x)
    chosen = plan(5)
    assert chosen.changes == {"gradient_checkpointing": True} and chosen.numerics == []
    assert chosen.chosen.total == 4 * GiB
    # 3.5 GB: only both levers together fit
    assert plan(3.5).changes == {"gradient_checkpointing": True, "batch_size": 2, "gradient_accumulation_steps": 2}


def test_nothing_fits_is_refused_in_one_line_with_the_budget_the_estimate_and_what_to_lower():
    with pytest.raises(ConfigError) as err:
        plan(2.5)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("memory_budget:")
    assert "2.5 GB" in message and "3.00 GB" in message  # the budget; the cheapest plan (both levers)
    assert "lower resolution or batch_size" in message


def test_the_next_cheaper_plan_and_the_one_a_saved_state_can_continue():
    chosen = plan(20)
    assert chosen.next.settings == {**VALUES, "batch_size": 2, "gradient_accumulation_steps": 2}  # fastest leaner
    assert chosen.next_keeping_batch.settings == {**VALUES, "gradient_checkpointing": True}
    assert chosen.event()["next"]["estimate_gb"] == 6.0
    leanest = plan(3.5)
    assert leanest.next is None and leanest.next_keeping_batch is None


def test_a_resumed_state_keeps_its_micro_batch():
    # the state was trained with batch 2 x 2: a plan that would go back to 4 x 1 cannot continue it
    plans = enumerate_plans(synthetic(), VALUES, GiB, pinned={"batch_size": 2, "gradient_accumulation_steps": 2})
    assert {(p.settings["batch_size"], p.settings["gradient_accumulation_steps"]) for p in plans} == {(2, 2)}
    assert cheaper(plans, plans[0]).settings["gradient_checkpointing"] is True


def test_budget_values():
    assert parse_budget("auto") == "auto" and parse_budget(None) == "auto"
    assert parse_budget("off") is None
    assert parse_budget("11.5") == 11.5 * GiB and parse_budget(8) == 8 * GiB
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_budget("plenty")


def test_the_benchmarks_estimate_column():
    from benchmarks.memory_estimate import memory_column, memory_fields

    fields = memory_fields({"device": "cpu", "estimate_gb": 1.5, "peak_gb": 1.25, "estimate_vs_peak": 0.2})
    assert fields["estimate_mb"] == 1536 and fields["estimate_peak_mb"] == 1280
    assert memory_column(fields) == "1536 MiB (+20% !)"  # past the 15% target: marked
    assert memory_column({**fields, "estimate_vs_peak": -0.05}) == "1536 MiB (-5%)"
    assert memory_fields({}) == {} and memory_column({}) == "-"  # a reference loop has no planner


KERNELS = r"""
import os, sys
import torch

from shared.training.memory import cap_kernel_caches, proc_status

if sys.argv[1] != "default":
    print("SET", cap_kernel_caches(int(sys.argv[1])))  # after importing torch, before its first matmul
torch.set_num_threads(1)
layer = torch.nn.Linear(512, 1408).to(torch.bfloat16)


def step(rows):
    x = torch.randn(rows, 512, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()


step(1024)
before = proc_status("VmRSS")
for rows in range(400, 1024, 12):  # a new batch width every step, as LLM rows of varied length make
    step(rows)
print("GROWTH", (proc_status("VmRSS") - before) / 2**20, os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
"""


def kernel_growth(capacity: str, **env) -> tuple[float, str]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from shared.training.memory import KERNEL_CACHE_ENV

    env = {**{k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_ENV},
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-c", KERNELS, capacity], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth, setting = proc.stdout.split("GROWTH ")[1].split()
    return float(growth), setting


def test_capped_kernel_caches_stop_new_batch_widths_from_growing_the_process():
    from shared.training.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("oneDNN compiles bf16 matmul kernels per shape only where the CPU has bf16")
    default, _ = kernel_growth("default")
    capped, setting = kernel_growth("8")
    assert setting == "8"
    assert default > 20 and capped < default / 3, (default, capped)  # measured: about 90 MiB against 8
    _, setting = kernel_growth("8", ONEDNN_PRIMITIVE_CACHE_CAPACITY="2048")  # the user's own setting stays
    assert setting == "2048"


def test_the_llm_estimate_counts_a_kernel_set_for_each_batch_width_up_to_the_cache_capacity(tiny_llama, chat_data,
                                                                                            tmp_path, monkeypatch):
    import contextlib

    import torch

    from shared.llm.memory import llm_memory_model
    from shared.training.task import Precision
    from tests.llm_fixtures import llm_config

    def kernels(lengths, device="cpu"):
        cfg = llm_config(tiny_llama, chat_data, tmp_path / "out", batch_size=4, max_seq_len=256, packing=False)
        precision = Precision(torch.device(device), torch.bfloat16, "bf16", contextlib.nullcontext)
        model = llm_memory_model(cfg, precision, lengths)
        return model.estimate({"batch_size": 4, "gradient_checkpointing": False, "attention": "sdpa"})["kernels"]

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    one_width = kernels([100] * 16)  # every batch as wide as the last: one set of kernels
    varied = list(range(200, 40, -1))  # 40 batches, each of its own width: more kernels than the cache keeps
    assert 0 < one_width < kernels(varied[:8]) < kernels(varied)  # two widths, then the capacity
    capped = kernels(varied)
    assert capped == kernels(varied[:120])  # capped: more widths add nothing
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")  # the libraries' own capacity keeps more
    assert kernels(varied) > capped
    assert kernels(varied, device="cuda") == 0  # the GPU's kernels are not in the process's RSS
