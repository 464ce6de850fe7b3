"""The Flux benchmark entries run (issue 19): the GPU entry's plan on the CPU with the tiny model,
so it is ready for the next lease. Numbers are printed, never asserted."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_flux_gpu_entry_dry_run(tmp_path):
    from benchmarks.gpu import flux_gpu

    result = flux_gpu.run(tmp_path / "out", tmp_path / "work", dry_run=True)
    assert set(result["variants"]) == set(flux_gpu.VARIANTS)
    assert all("error" not in v and v["median_step_s"] > 0 for v in result["variants"].values())
    assert result["variants"]["fp8 base + swap 20"]["blocks_swapped"] == 2
    saved = json.loads((tmp_path / "out" / "flux-gpu-dry-run.json").read_text())
    assert saved["settings"]["resolution"] == 64
    assert "| fp8 base |" in (tmp_path / "out" / "flux-gpu-dry-run.md").read_text()
