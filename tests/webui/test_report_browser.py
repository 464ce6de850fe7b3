"""A job's report.html opened in a real headless Chromium from its file: the verdict, the loss and score
curves, the data set's histogram and the evaluation grid of each checkpoint are drawn, and the page asks
the network for nothing.

LORA_REPORT_SCREENSHOT=docs/images/report.png makes this test also write the documentation's screenshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from webui_env import HERE, gradio3_python

from shared.preflight import load_config
from shared.train import run_training


def test_the_report_opens_in_chromium_with_its_curves_and_grids(sd_config, tmp_path):
    python = gradio3_python()
    config = sd_config(output_dir=tmp_path / "out" / "report_demo", max_train_steps=12, save_steps=6,
                       learning_rate=5e-3, evaluation=True, sample_steps=6, eval_sample_steps=6,
                       cache_latents="memory", eval_weights="0.5, 1")
    result = run_training(load_config(config))
    shot = tmp_path / "report.png"
    proc = subprocess.run([python, str(HERE / "open_report.py"), str(result.report), "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=180, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    assert seen["title"] == "report_demo: LoRA training report" and seen["requests"] == []
    assert seen["verdicts"] and all(v for v in seen["verdicts"])  # a warning, or "No problem found"
    titles = [c["title"] for c in seen["charts"]]
    assert len(titles) == 3, seen["charts"]  # the loss curve, the scores with their thresholds, the histogram
    assert all(c["width"] > 300 and c["height"] > 100 for c in seen["charts"]), seen["charts"]
    assert seen["charts"][0]["lines"] >= 1 and seen["charts"][1]["lines"] >= 1 and seen["charts"][2]["bars"] == 1
    # one grid per evaluation (the checkpoints at 6 and 12, and the end), decoded and on screen:
    # three prompts of 64 px under a label row, base and two weights beside a number column
    assert len(seen["grids"]) == 2 or len(seen["grids"]) == 3, seen["grids"]
    for grid in seen["grids"]:
        assert grid["complete"] and grid["natural"] == [18 + 64 * 3, 16 + 64 * 3] and grid["shown"][0] > 100
    assert shot.stat().st_size > 20_000
    if os.environ.get("LORA_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, Path(os.environ["LORA_REPORT_SCREENSHOT"]))
