"""Preference tuning through the one training loop (`objective: dpo | orpo | kto`): DPO raises the
chosen-over-rejected margin on held-out pairs (in the checkpoint events, TensorBoard and
training_info.json), a stopped run resumes to where an unbroken one ends, two processes train what
one does, and bad preference rows are refused by the pre-flight with their file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shared.errors import ConfigError, DatasetError
from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS
from shared.preflight import load_config
from shared.train import run_training
from tests.llm_fixtures import llm_config, llm_values
from tests.test_llm_training import Recorder

BAD = "I do not know."


@pytest.fixture
def prefs(tmp_path) -> Path:
    """20 pairs: the made-up answer over "I do not know." (alpaca style)."""
    path = tmp_path / "data" / "prefs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "chosen": a, "rejected": BAD} for q, a in INSTRUCTION_PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(base, data, out, **overrides):
    values = dict(objective="dpo", val_split=0.2, learning_rate=5e-3, max_train_steps=30, save_steps=10,
                  sample_prompts=[INSTRUCTION_PAIRS[0][0]], sample_max_tokens=4)
    return llm_config(base, data, out, **{**values, **overrides})


def held_out_margin(model, tokenizer, prefs) -> tuple[float, float]:
    """The pair margin and accuracy of `model` on the held-out pairs the job holds out (same split)."""
    from shared.llm.preference import build_preference_data
    from shared.llm.preference_loss import pair_stats

    data = build_preference_data(prefs, tokenizer, max_seq_len=64, val_split=0.2, seed=0)
    return pair_stats(model, data.val, tokenizer.pad_token_id)


@pytest.mark.slow
def test_dpo_through_the_loop_raises_the_held_out_margin(tiny_llama, llm_tokenizer, prefs, tmp_path):
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shared.llm.model import load_causal_lm

    before, before_accuracy = held_out_margin(load_causal_lm(tiny_llama), llm_tokenizer, prefs)
    rec = Recorder()
    result = run_training(pref_config(tiny_llama, prefs, tmp_path / "out" / "dpo"), rec)
    assert result.steps == 30
    log = "\n".join(rec.lines)
    assert "Objective: DPO, beta 0.1 on 16 pairs (reference: the base (the adapter switched off))" in log
    checkpoints = [d for k, d in rec.events if k == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [10, 20]
    assert all(set(c) >= {"pair_margin", "pair_accuracy"} and "eval_loss" not in c for c in checkpoints)

    info = json.loads((result.output_path / "training_info.json").read_text())
    assert info["objective"] == "dpo" and (info["train_pairs"], info["val_pairs"]) == (16, 4)
    margins = [c["pair_margin"] for c in checkpoints] + [info["pair_margin"]]
    assert info["pair_margins"] == pytest.approx(margins)
    after = info["pair_margin"]
    print(f"\nDPO through the loop, held-out margin log p(chosen) - log p(rejected): base {before:+.2f} "
          f"(accuracy {before_accuracy:.0%}) -> steps 10/20/30 {' / '.join(f'{m:+.2f}' for m in margins)}")
    assert after > 0 > before and after > before + 10  # the held-out preference flipped

    # the published adapter is what was evaluated: reloaded with PEFT on the fp32 base it gives the same
    # margin, up to the bf16 storage of the base the loop evaluated on (mixed_precision auto)
    reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_llama), str(result.output_path))
    assert held_out_margin(reloaded, llm_tokenizer, prefs)[0] == pytest.approx(after, rel=5e-3, abs=1e-3)

    board = EventAccumulator(str(tmp_path / "out" / "dpo" / "logs")).Reload()
    tags = set(board.Tags()["scalars"])
    assert {"loss", "train/margin", "train/reward_margin", "train/accuracy", "eval/pair_margin",
            "eval/pair_accuracy"} <= tags
    accuracy = [e.value for e in board.Scalars("train/accuracy")]
    assert len(accuracy) == 30 and accuracy[-1] == 1.0
    assert [e.step for e in board.Scalars("eval/pair_margin")] == [10, 20, 30]


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_through_the_loop(tiny_llama, prefs, tmp_path, method):
    rec = Recorder()
    result = run_training(pref_config(tiny_llama, prefs, tmp_path / method, objective=method, max_train_steps=3,
                                      batch_size=3, save_steps=0), rec)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    info = json.loads((result.output_path / "training_info.json").read_text())
    assert info["objective"] == method and isinstance(info["pair_margin"], float)
    assert any(line.startswith("Eval at step 3: pair margin ") for line in rec.lines)


def test_batches_count_pairs_and_kto_never_gets_a_single_pair(tiny_llama, llm_tokenizer, prefs):
    from shared.llm.objective import preference_objective

    def batches(method, epoch):
        cfg = pref_config(tiny_llama, prefs, Path("unused"), objective=method, batch_size=3)
        objective = preference_objective(cfg, llm_tokenizer, Recorder())
        return objective.epoch_batches(epoch, 3)

    dpo, kto = batches("dpo", 0), batches("kto", 0)
    assert [len(b) for b in dpo] == [3, 3, 3, 3, 3, 1]  # 16 training pairs
    assert [len(b) for b in kto] == [3, 3, 3, 3, 4]  # the single last pair joins the batch before
    assert [p.where for b in dpo for p in b] == [p.where for b in kto for p in b]  # the same seeded order
    assert [p.where for b in batches("dpo", 0) for p in b] == [p.where for b in dpo for p in b]
    assert [p.where for b in batches("dpo", 1) for p in b] != [p.where for b in dpo for p in b]
    assert preference_objective(llm_config(tiny_llama, prefs, Path("unused")), llm_tokenizer, Recorder()) is None


def test_a_stopped_dpo_run_resumes_to_the_end_of_an_unbroken_one(tiny_llama, prefs, tmp_path):
    """Two micro-batches per step and dropout on: the resume restores the position inside the epoch and
    the RNG behind the policy's dropout masks (the reference runs without dropout)."""
    common = dict(max_train_steps=6, save_steps=0, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1,
                  sample_prompts=None, sample_max_tokens=1, val_split=0.2)
    whole = run_training(pref_config(tiny_llama, prefs, tmp_path / "whole" / "job", **common))
    stopped = run_training(pref_config(tiny_llama, prefs, tmp_path / "parts" / "job", **common), Recorder(stop_at=3))
    assert stopped.stopped_early and stopped.steps == 3
    rec = Recorder()
    resumed = run_training(pref_config(tiny_llama, prefs, tmp_path / "parts" / "job", resume="latest", **common), rec)
    assert any(line.startswith("Resumed from ") and line.endswith("at step 3") for line in rec.lines)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a = load_file(str(whole.output_path / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_path / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    # a state trained with another objective is not continued
    with pytest.raises(ConfigError, match=r"resume: .* was trained with other settings \(objective: state has "
                                          r"'dpo', config has 'orpo'\)"):
        run_training(pref_config(tiny_llama, prefs, tmp_path / "parts" / "job", resume="state-step000003",
                                 objective="orpo", **common))


@pytest.mark.slow
def test_dpo_on_two_processes_trains_what_one_process_does(tiny_llama, prefs, tmp_path):
    """DPO's loss is a mean over pairs, normalised over all ranks like SFT's tokens, and each rank's
    reference is its own base: two processes of 2 pairs train what one process does with the same two
    micro-batches of 2 accumulated. (Against one batch of 4 the adapters differ by up to 1e-2 in one
    tensor: the rows are padded to another width, and AdamW's first steps turn the last-bit
    differences of near-zero gradient elements into full-size updates; one process with batch 2 x 2
    accumulation differs from batch 4 by exactly as much.)"""
    from tests.llm_fixtures import write_config
    from tests.test_distributed import LLM_TOL, cli_train, relative_difference

    def config(name, **overrides):
        values = llm_values(tiny_llama, prefs, tmp_path / name, objective="dpo", max_train_steps=3, learning_rate=5e-3,
                            sample_prompts=None, sample_max_tokens=1, **overrides)
        return write_config(tmp_path / f"{name}.yaml", **values)

    def adapter(folder: Path) -> dict:
        [found] = [p for p in folder.iterdir() if (p / "adapter_model.safetensors").is_file()]  # one output
        return load_file(str(found / "adapter_model.safetensors"))

    run_training(load_config(config("one", batch_size=2, gradient_accumulation_steps=2)))
    out = cli_train(config("two", batch_size=2, num_processes=2))
    assert "effective batch 4" in out
    difference = relative_difference(adapter(tmp_path / "one"), adapter(tmp_path / "two"), "lora_B")
    print("DPO 1 process 2 x 2 accumulated vs 2 processes x 2:", difference)
    assert difference < LLM_TOL
    run_training(load_config(config("half", batch_size=2)))  # the control: half the batch trains otherwise
    assert relative_difference(adapter(tmp_path / "one"), adapter(tmp_path / "half"), "lora_B") > 10 * LLM_TOL


# --- the pre-flight -----------------------------------------------------------------------------------

def write_job(tmp_path, base, data, **values) -> Path:
    job = llm_values(base, data, tmp_path / "out", **values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in job.items()}))
    return path


@pytest.mark.parametrize(("content", "objective", "expected"), [
    ('{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a", "chosen": "b"}\n', "dpo",
     r"prefs.jsonl line 2: a preference row needs `chosen` and `rejected`"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "same", "rejected": "same"}\n',
     "kto", r"prefs.jsonl line 3: `chosen` and `rejected` are the same answer"),
    ('{"instruction": "a", "chosen": "b", "rejected": "c"}\n', "sft",
     r"prefs.jsonl line 1: `output` is missing or empty; rows with `chosen` and `rejected` answers train with "
     r"objective: dpo, orpo or kto"),
])
def test_bad_preference_rows_are_refused_by_the_preflight(tiny_llama, tmp_path, content, objective, expected):
    data = tmp_path / "prefs.jsonl"
    data.write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        load_config(write_job(tmp_path, tiny_llama, data, objective=objective, batch_size=2))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("values", "expected"), [
    (dict(objective="kto", batch_size=1), "objective: kto estimates its reference point from the other pairs of a "
                                          "batch; set batch_size to 2 or more"),
    (dict(objective="kto", batch_size=2, num_processes=2), "objective: kto estimates its reference point from the "
                                                           "whole batch and runs in one process"),
    (dict(objective="orpo", dpo_label_smoothing=0.1), "dpo_label_smoothing applies to objective: dpo (this job's "
                                                      "objective is orpo)"),
    (dict(objective="ipo"), "objective: 'ipo' is not one of sft, dpo, orpo, kto"),
    (dict(pref_beta=0), "pref_beta must be greater than 0 and at most 10, got 0"),
])
def test_preference_settings_are_checked_with_the_config(tiny_llama, prefs, tmp_path, values, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write_job(tmp_path, tiny_llama, prefs, **values))
