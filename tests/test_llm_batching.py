"""Length-grouped LLM batches: deterministic from the seed, every row once an epoch, much less padding
than random batches, and a stopped run resumes into exactly the batches an unbroken run trains on."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from shared.llm.batching import grouped_batches, padded_tokens, shuffled
from shared.train import run_training
from tests.llm_fixtures import llm_config
from tests.test_llm_training import Recorder

_rng = random.Random(3)
LENGTHS = [_rng.choice([12, 30, 60, 120, 250]) + _rng.randint(0, 9) for _ in range(300)]


def test_grouped_batches_are_a_pure_function_of_seed_and_epoch():
    a = grouped_batches(LENGTHS, 4, seed=7, epoch=0)
    assert a == grouped_batches(LENGTHS, 4, seed=7, epoch=0)
    assert a != grouped_batches(LENGTHS, 4, seed=7, epoch=1) != grouped_batches(LENGTHS, 4, seed=8, epoch=0)
    for epoch in range(3):
        batches = grouped_batches(LENGTHS, 4, seed=7, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))  # every row once
        assert [len(b) for b in batches].count(4) == len(LENGTHS) // 4
        first = batches[0]  # the batch with the most tokens goes first: an OOM shows at step 1
        assert len(first) * max(LENGTHS[i] for i in first) == max(len(b) * max(LENGTHS[i] for i in b) for b in batches)


def test_grouping_cuts_padding():
    order = shuffled(len(LENGTHS), 7, 0)
    plain = [order[j:j + 4] for j in range(0, len(order), 4)]  # what the loop trained before: random batches
    grouped = grouped_batches(LENGTHS, 4, seed=7, epoch=0)
    real = sum(LENGTHS)
    assert padded_tokens(LENGTHS, plain) > 1.5 * real  # random batches: mostly padding
    assert padded_tokens(LENGTHS, grouped) < 1.05 * real  # grouped: under 5% padding


def varied_data(tmp_path):
    """Chat rows of very different lengths (answers of 1 to 40 words)."""
    words = "the sky on zorblax is green and seven moons of pellucid hum softly".split()
    rows = []
    for i in range(12):
        answer = " ".join(words[(i + k) % len(words)] for k in range(1 + 3 * i))
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": answer}]})
    path = tmp_path / "data" / "rows.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_length_grouped_run_resumes_exactly(tiny_llama, tmp_path):
    data = varied_data(tmp_path)
    common = dict(max_train_steps=6, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, packing=False,
                  learning_rate=5e-3, sample_prompts=["Question 1?"], sample_max_tokens=2, max_seq_len=128)
    rec = Recorder()
    whole = run_training(llm_config(tiny_llama, data, tmp_path / "whole", **common), rec)
    assert "packing: false (median row" in "\n".join(rec.lines)
    stopped = run_training(llm_config(tiny_llama, data, tmp_path / "parts", **common), Recorder(stop_at=2))
    assert stopped.stopped_early and stopped.steps == 2
    saved = json.loads((tmp_path / "parts" / "checkpoints" / "state-step000002" / "trainer.json").read_text())
    assert (saved["epoch"], saved["next_batch"]) == (0, 4)  # 6 micro-batches an epoch: stopped mid-epoch
    resumed = run_training(llm_config(tiny_llama, data, tmp_path / "parts", resume="latest", **common), Recorder())
    assert resumed.steps == 6 and resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a = load_file(str(whole.output_path / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_path / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
