"""The memory planner's estimate against the measured peak of a real job (shared/training/memory.py).

Peak RSS (the kernel's VmHWM) counts from a process's start, so each job runs in a fresh Python
process that does nothing else. The configs are sized so the parts the planner estimates (weights,
activations, the LoRA and its optimizer state, caches) are a real share of the peak, not only the
baseline it measures: a wrong activation model moves the estimate out of the 15%.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15

# A job in a process of its own: its `memory_plan` event and its result's estimate beside the peak.
CHILD = """
import json, os, sys
from pathlib import Path
from shared.preflight import load_config
from shared.reporting import Reporter
from shared.train import run_training

class Events(Reporter):
    plan = None
    def log(self, message):
        pass
    def event(self, kind, **data):
        if kind == "memory_plan":
            Events.plan = data

result = run_training(load_config(Path(sys.argv[1])), Events())
print("RESULT " + json.dumps({"plan": Events.plan, "memory": result.memory,
                              "kernel_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}))
"""


def run_job(config: Path) -> tuple[dict, dict, str | None]:
    """The job's memory plan, its estimate beside the peak, and the oneDNN kernel cache it ran with."""
    # without the kernel-cache capacities an earlier job in this test process may have set
    from shared.training.memory import KERNEL_CACHE_ENV

    inherited = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_ENV}
    env = {**inherited, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    return out["plan"], out["memory"], out["kernel_cache"]


def check(plan: dict, memory: dict) -> None:
    assert memory["device"] == "cpu" and memory["measured"] == "VmHWM"
    estimate, peak = memory["estimate_gb"], memory["peak_gb"]
    estimated_parts = estimate - plan["parts"]["baseline"]
    # what the planner models, not only the baseline it measured, is a real share of the peak
    assert estimated_parts > 0.05 * peak, plan["parts"]
    assert abs(estimate / peak - 1) <= TOLERANCE, (memory, plan["parts"])
    assert memory["estimate_vs_peak"] == pytest.approx(estimate / peak - 1, abs=0.002)


@pytest.mark.slow
def test_sd_estimate_is_within_15_percent_of_the_peak_rss(tmp_path, tiny_sd, image_dir):
    # 256 px, batch 4: the VAE encoding each batch and the UNet's backward are ~15% of the peak
    config = write_config(tmp_path / "config.yaml", base_model=tiny_sd["safetensors"],
                          model_config=tiny_sd["config"], train_data_dir=image_dir,
                          output_dir=tmp_path / "out" / "sd", resolution=256, batch_size=4, max_train_steps=2,
                          save_steps=0, learning_rate=1e-3, seed=0, memory_budget="off")
    plan, memory, kernels = run_job(config)
    check(plan, memory)
    assert kernels is None  # a bucket's batches repeat their shapes: the libraries' own cache


@pytest.mark.slow
def test_llm_estimate_is_within_15_percent_of_the_peak_rss(tmp_path, tiny_llama):
    # rows of 512 tokens, batch 16 (bf16 on a CPU with bf16 halves them): the activations and logits are ~10% of the peak
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo planes".split()
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(300))}) + "\n"
                            for _ in range(32)), encoding="utf-8")
    config = write_config(tmp_path / "config.yaml", base_model=tiny_llama, train_data_dir=data,
                          output_dir=tmp_path / "out" / "llm", max_seq_len=512, batch_size=16, max_train_steps=3,
                          learning_rate=1e-3, lora_dropout=0.0, save_steps=0, seed=0, device="cpu",
                          memory_budget="off")
    plan, memory, kernels = run_job(config)
    check(plan, memory)
    assert kernels == "64"  # rows of varied length: the compiled-kernel caches are capped (LLMTask.kernel_cache)


def test_a_job_that_cannot_fit_its_budget_is_refused_before_it_loads(sd_config, tmp_path):
    from shared.errors import ConfigError
    from shared.preflight import load_config
    from shared.reporting import Reporter
    from shared.train import run_training

    events = []

    class Events(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            events.append(kind)

    cfg = load_config(sd_config(memory_budget="0.1", output_dir=tmp_path / "out" / "refused"))
    with pytest.raises(ConfigError) as err:
        run_training(cfg, Events())
    message = str(err.value)
    assert message.startswith("memory_budget: the cheapest plan") and "\n" not in message
    assert "0.1 GB (memory_budget)" in message and "baseline" in message  # the budget; the parts
    assert events == [] and not (tmp_path / "out").exists()  # nothing loaded, nothing written
