"""The benchmark suite's quick mode runs end to end on tiny models and writes every section.

Speed is never asserted here (the numbers depend on the machine); this checks that the one command
works, that each comparison produced its numbers, and that the loss curves of our trainer and the
reference loop agree on the same seed (a correctness property, not a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "latest.json").read_text())
    assert result["quick"] is True
    assert {"cpu", "cores", "torch"} <= set(result["machine"])

    sd = result["sd"]
    assert set(sd["variants"]) == {"ref", "ref_best", "ours", "ours_fp32"}
    for row in sd["variants"].values():
        assert row["median_step_s"] > 0 and row["peak_rss_mb"] > 0 and row["flops_per_step"] > 0
        assert row["mfu"] is not None and row["time_ratio_vs_ref"] > 0 and row["time_ratio_vs_ref_best"] > 0
    v = sd["variants"]
    # the defaults cache: their step is the UNet's alone, as the best reference's is
    assert v["ours"]["caches"] == {"latents": True, "text": True} == v["ref_best"]["caches"]
    assert v["ours_fp32"]["flops_per_step"] > v["ours"]["flops_per_step"] == v["ref_best"]["flops_per_step"]
    assert v["ours"]["estimate_mb"] > 0 and "estimate_mb" not in v["ref"]  # the planner's, ours only
    assert set(sd["targets_met"]) == {"time_vs_ref", "time_vs_ref_best", "peak_rss_mb"}
    curves = sd["loss_curves"]
    assert curves["steps"] >= 2 and curves["max_abs_diff"] < 1e-4  # same seed, same start: same losses

    llm = result["llm"]
    assert set(llm["variants"]) == {"ref", "ref_best", "ours", "ours_bf16", "ours_sdpa", "ours_packed"}
    for row in llm["variants"].values():
        assert row["tokens_per_s"] > 0 and row["trained_tokens"] > 0 and row["peak_rss_mb"] > 0
        assert row["trained_tokens"] <= row["padded_tokens"]
    # every variant trains one epoch of the same rows: the same trained tokens, however it batches them
    assert len({row["epoch_trained_tokens"] for row in llm["variants"].values()}) == 1
    assert llm["flops_per_padded_token"] > 0

    daemon = result["daemon"]
    assert daemon["torch_loaded"] is False
    assert daemon["idle_rss_mb_median"] > 0 and daemon["start_s_median"] > 0
    assert daemon["fanout"]["subscribers_complete"] == daemon["fanout"]["subscribers"] == 50
    assert daemon["fanout"]["events_received"] > 0
    for key in ("submit_to_first_progress_s", "overhead_s", "first_progress_delay_s"):
        assert isinstance(daemon[key], float)

    flux = result["flux"]["tiny"]
    assert set(flux) == {"base", "fp8 base"}
    assert all(row["median_step_s"] > 0 and row["peak_rss_mb"] > 0 for row in flux.values())
    assert flux["fp8 base"]["block_weight_mb"] < flux["base"]["block_weight_mb"]  # what fp8 storage holds

    table = (out / "latest.md").read_text()
    for heading in ("### SD1.5 LoRA", "### LLM LoRA", "### Flux LoRA", "### Daemon"):
        assert heading in table
