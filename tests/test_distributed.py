"""Data-parallel training through `accelerate launch` on the CPU (gloo, two processes).

A 2-process run with batch 2 per process must train the same adapter as a 1-process run with
batch 4 and the same seed: the ranks split each global batch, each sample's noise and timestep come
from the sample (not from the process), the loss is normalised over the whole batch and the
gradients are averaged. What differs is float summation order in batched matmuls and in the
all-reduce; the tolerance below allows for that and nothing more (a wrong shard, doubled data or
an unsynced rank moves the weights by far more: see the control in each test).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llm_fixtures import chat_data, llm_values  # noqa: F401  (chat_data is a fixture)
from llm_fixtures import write_config as write_llm_config

from shared.preflight import load_config
from shared.train import run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Max |a - b| over all LoRA tensors, relative to the largest |a|: measured ~1e-6 (SD) and ~1e-6
# (LLM) on this box; an unsynced or wrongly sharded run differs by 1e-2 or more.
SD_TOL = 5e-3
LLM_TOL = 1e-3


def cli_train(config, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "daemon", "train", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def relative_difference(a: dict, b: dict, trained: str) -> float:
    """Max |a - b| over the tensors that start at zero (`trained` in the name: what training wrote),
    relative to their largest value."""
    assert a.keys() == b.keys()
    keys = [k for k in a if trained in k]
    assert keys
    scale = max(float(a[k].float().abs().max()) for k in keys)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys) / scale


def test_sd_two_processes_match_one_process_with_the_same_total_batch(sd_config, tmp_path):
    from safetensors.torch import load_file

    # fp32: in bf16 the two batch shapes round differently, and Adam's first steps turn those last-bit
    # differences into sign flips; what this test checks (sharding, normalisation, sync) is the same
    common = dict(max_train_steps=3, lora_dropout=0.0, learning_rate=1e-3, device="cpu", lr_warmup_steps=1,
                  mixed_precision="no")
    one = sd_config(batch_size=4, num_processes=1, output_dir=tmp_path / "one" / "lora", **common)
    result = run_training(load_config(one))
    single = load_file(str(result.output_path))

    two = sd_config(batch_size=2, num_processes=2, output_dir=tmp_path / "two" / "lora", **common)
    out = cli_train(two)
    assert "batch 2 x 1 accumulation x 2 processes = effective batch 4" in out, out
    written = sorted(p.name for p in (tmp_path / "two" / "lora").iterdir() if p.suffix == ".safetensors")
    assert written == ["lora.safetensors"]  # one output: the other rank wrote nothing
    double = load_file(str(tmp_path / "two" / "lora" / "lora.safetensors"))
    print("SD 1x4 vs 2x2:", relative_difference(single, double, "lora_up"))
    assert relative_difference(single, double, "lora_up") < SD_TOL

    # control: one process with half the batch (what a rank training alone would do) is far off
    half = sd_config(batch_size=2, num_processes=1, output_dir=tmp_path / "half" / "lora", **common)
    other = load_file(str(run_training(load_config(half)).output_path))
    print("SD 1x4 vs 1x2:", relative_difference(single, other, "lora_up"))
    assert relative_difference(single, other, "lora_up") > 10 * SD_TOL


def test_llm_two_processes_match_one_process_with_the_same_total_batch(tiny_llama, chat_data, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    def config(name, **overrides):
        values = llm_values(tiny_llama, chat_data, tmp_path / name, max_train_steps=4, sample_prompts=None,
                            sample_max_tokens=8, mixed_precision="no", **overrides)  # fp32: see the SD test
        return write_llm_config(tmp_path / f"{name}.yaml", **values)

    result = run_training(load_config(config("one", batch_size=4)))
    single = load_file(str(result.output_path / "adapter_model.safetensors"))

    out = cli_train(config("two", batch_size=2, num_processes=2))
    assert "effective batch 4" in out
    adapters = [p for p in (tmp_path / "two").iterdir() if (p / "adapter_model.safetensors").is_file()]
    assert len(adapters) == 1, adapters  # one output
    double = load_file(str(adapters[0] / "adapter_model.safetensors"))
    print("LLM 1x4 vs 2x2:", relative_difference(single, double, "lora_B"))
    assert relative_difference(single, double, "lora_B") < LLM_TOL

    other = run_training(load_config(config("half", batch_size=2)))
    other = load_file(str(other.output_path / "adapter_model.safetensors"))
    print("LLM 1x4 vs 1x2:", relative_difference(single, other, "lora_B"))
    assert relative_difference(single, other, "lora_B") > 10 * LLM_TOL


@pytest.mark.parametrize("values, message", [
    ({"num_processes": 0}, "num_processes must be at least 1"),
    ({"num_processes": 1, "num_machines": 2, "main_process_ip": "10.0.0.1"}, "must be at least num_machines"),
    ({"num_processes": 3, "num_machines": 2, "main_process_ip": "10.0.0.1"}, "split evenly"),
    ({"num_processes": 4, "num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}, "machine_rank must be in 0..1"),
    ({"num_processes": 4, "num_machines": 2}, "main_process_ip is needed"),
    ({"num_processes": 2, "main_process_port": 70000}, "main_process_port must be at least 1 and at most 65,535"),
])
def test_launch_keys_are_checked(sd_config, values, message):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(sd_config(**values))


def test_launch_command_for_each_machine(sd_config, tmp_path):
    from shared.training.launch import launch_command

    local = launch_command(load_config(sd_config(num_processes=2)), tmp_path, 29555)
    assert local[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in local and "--cpu" not in local
    assert local[local.index("--num_processes") + 1] == "2" and local[local.index("--main_process_port") + 1] == "29555"
    assert local[-3:] == ["-m", "shared.distributed", str(tmp_path)]

    cfg = load_config(sd_config(num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.5"))
    node = launch_command(cfg, tmp_path, 29500)
    for flag, value in [("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "10.0.0.5")]:
        assert node[node.index(flag) + 1] == value

    acc = tmp_path / "ds.yaml"
    acc.write_text("distributed_type: DEEPSPEED\n")
    cfg = load_config(sd_config(accelerate_config=acc))
    via_file = launch_command(cfg, tmp_path, None)
    assert via_file[via_file.index("--config_file") + 1] == str(acc)
    assert "--multi_gpu" not in via_file and "--num_processes" not in via_file  # the file decides


def test_sd_shard_weights_give_the_whole_batch_mean_even_for_a_short_last_batch():
    import types

    from shared.images.train_data import TrainData

    cfg = types.SimpleNamespace(batch_size=2)

    def shards(samples):
        return [TrainData(cfg, [], None, [], processes=2, rank=r).shard(samples) for r in (0, 1)]

    losses = {"a": 1.0, "b": 2.0, "c": 6.0}
    for batch in (["a", "b", "c"], ["a"], ["a", "b"]):
        parts = shards(batch)
        assert all(mine for mine, _ in parts)  # every rank trains something: the DDP exchange needs it
        # DDP averages the ranks: mean over ranks of (weight x the rank's mean loss) = the batch's mean
        ddp = sum(w * sum(losses[s] for s in mine) / len(mine) for mine, w in parts) / 2
        assert abs(ddp - sum(losses[s] for s in batch) / len(batch)) < 1e-12
    assert shards(["a"])[1] == (["a"], 0.0)  # nothing left for rank 1: a sample with weight 0
