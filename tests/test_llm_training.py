"""Training LLM LoRAs end to end on tiny causal LMs: memorise made-up answers, stop at EOS, reload
the adapter with PEFT, resume, never replace an earlier adapter, and the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import ConfigError, DatasetError
from shared.llm.model import load_causal_lm, load_tokenizer
from shared.reporting import Reporter
from shared.train import run_training
from tests.llm_fixtures import PAIRS, answers, llm_config, llm_values, write_config

REPO = Path(__file__).resolve().parent.parent


class Recorder(Reporter):
    def __init__(self, stop_at: int | None = None):
        self.lines, self.events, self.stop_at, self.step = [], [], stop_at, 0

    def log(self, message):
        self.lines.append(message)

    def event(self, kind, **data):
        self.events.append((kind, data))
        if kind == "progress":
            self.step = data["step"]

    def stop_requested(self):
        return self.stop_at is not None and self.step >= self.stop_at


def read_samples(log_dir: Path, step: int) -> dict[str, dict]:
    rows = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    return {r["prompt"]: r for r in rows if r["step"] == step}


@pytest.mark.parametrize("which", ["llama", "glm"])
def test_training_teaches_answers_and_eos_and_the_adapter_reloads(tiny_llama, tiny_glm, chat_data, tmp_path, which):
    from peft import PeftModel

    folder = tiny_llama if which == "llama" else tiny_glm
    remote = which == "glm"
    tokenizer = load_tokenizer(folder, trust_remote_code=remote)
    base = load_causal_lm(folder, trust_remote_code=remote)
    before = answers(base, tokenizer)
    assert not any(g.text == a for g, (_, a) in zip(before, PAIRS))  # nothing known before training

    targets = None if which == "llama" else ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    cfg = llm_config(folder, chat_data, tmp_path / "out" / "facts", trust_remote_code=remote, target_modules=targets,
                     save_steps=100, val_split=0.0)
    rec = Recorder()
    result = run_training(cfg, rec)
    assert result.steps == 150 and result.losses[-1] < 0.2 * result.losses[0]

    adapter = result.output_path
    assert adapter == tmp_path / "out" / "facts" / "facts"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {p.name for p in adapter.iterdir()}
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    modules = {k.split(".lora_")[0] for k in keys}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} if which == "llama" else set(targets)
    assert {m.rsplit(".", 1)[-1] for m in modules} == expected

    reloaded = PeftModel.from_pretrained(load_causal_lm(folder, trust_remote_code=remote), str(adapter))
    after = answers(reloaded, tokenizer)
    for gen, (_, answer) in zip(after, PAIRS):
        assert gen.text == answer and gen.stopped  # the trained answer, then EOS: generation stops
        assert gen.token_ids[-1] == tokenizer.eos_token_id
    # the reloaded adapter answers exactly as the trained model did at its last step
    final = read_samples(tmp_path / "out" / "facts" / "logs", 150)
    assert [final[q]["output"] for q, _ in PAIRS] == [g.text for g in after]

    log = "\n".join(rec.lines)
    assert "Injected LoRA adapters with rank=8" in log and "Training started... total steps: 150" in log
    assert f"Sample at step 100: {PAIRS[0][0]!r} -> " in log  # samples at each checkpoint, in the log
    assert (tmp_path / "out" / "facts" / "checkpoints" / "facts-step000100" / "adapter_model.safetensors").is_file()
    assert [k for k, _ in rec.events].count("checkpoint") == 1
    assert list((tmp_path / "out" / "facts" / "logs").glob("events.out.tfevents.*"))  # TensorBoard


def test_resume_matches_an_unbroken_run_and_nothing_is_replaced(tiny_llama, chat_data, tmp_path):
    common = dict(max_train_steps=6, save_steps=3, batch_size=2, lora_dropout=0.1, learning_rate=5e-3,
                  sample_prompts=[PAIRS[0][0]], sample_max_tokens=4, val_split=0.25)
    whole = run_training(llm_config(tiny_llama, chat_data, tmp_path / "a", **common), Recorder())
    out = tmp_path / "b"
    rec = Recorder(stop_at=3)
    first = run_training(llm_config(tiny_llama, chat_data, out, **common), rec)
    assert first.stopped_early and first.steps == 3 and first.output_path == out / "b"
    assert any(line.startswith("Eval at step 3: loss") and "perplexity" in line for line in rec.lines)
    [checkpoint] = [data for kind, data in rec.events if kind == "checkpoint"]
    assert checkpoint["step"] == 3 and checkpoint["eval_loss"] > 0 and checkpoint["perplexity"] > 1
    first_bytes = (first.output_path / "adapter_model.safetensors").read_bytes()

    rec = Recorder()
    second = run_training(llm_config(tiny_llama, chat_data, out, resume="latest", **common), rec)
    assert f"Resumed from {out / 'checkpoints' / 'state-step000003'} at step 3" in rec.lines
    assert second.steps == 6 and len(second.losses) == 6  # the state carries the losses before it
    assert second.losses == pytest.approx(whole.losses, rel=1e-4)
    a = load_file(str(whole.output_path / "adapter_model.safetensors"))
    b = load_file(str(second.output_path / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # a second run into the same output_dir gets its own folder; the first adapter is untouched
    assert second.output_path == out / "b_2"
    assert (first.output_path / "adapter_model.safetensors").read_bytes() == first_bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left
    for bad in ("step-000009", str(out / "checkpoints" / "step-000003"), "../b/checkpoints/step-000003"):
        with pytest.raises(ConfigError, match=re.escape(f"resume: '{bad}' is not a checkpoint in ")):
            run_training(llm_config(tiny_llama, chat_data, out, resume=bad, **common))


def test_merged_export_matches_the_adapter(tiny_llama, chat_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = llm_config(tiny_llama, chat_data, tmp_path / "out", max_train_steps=5, merge_output=True,
                     use_rslora=True, sample_prompts=None, deploy_dir=tmp_path / "loras")
    rec = Recorder()
    result = run_training(cfg, rec)
    assert result.deployed_path == tmp_path / "loras" / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.deployed_path / name).read_bytes() == (result.output_path / name).read_bytes()
    assert any(line.startswith("Sample at step 5: ") for line in rec.lines)  # default prompts from the data
    merged_dir = tmp_path / "out" / "out-merged"
    assert (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True)
    with_adapter = PeftModel.from_pretrained(load_causal_lm(tiny_llama), str(result.output_path))
    assert with_adapter.peft_config["default"].use_rslora
    ids = torch.arange(1, 21).view(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, load_causal_lm(tiny_llama)(ids).logits, atol=1e-4)


def test_empty_dataset_is_one_clear_error_and_writes_nothing(tiny_llama, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "rows.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="holds no rows to train on"):
        run_training(llm_config(tiny_llama, empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def test_cli_trains_an_llm_adapter(tiny_llama, chat_data, tmp_path):
    values = llm_values(tiny_llama, chat_data, tmp_path / "out" / "cli", max_train_steps=20, sample_prompts=[PAIRS[0][0]])
    config = write_config(tmp_path / "llm.yaml", **values)
    proc = run_cli("train", "--config", str(config), "--set", "output_name=my_adapter")
    assert proc.returncode == 0, proc.stderr
    for line in ("Found 8 rows (chat)", "Using device: cpu", "Loaded base model from", "Injected LoRA adapters",
                 "Training started... total steps: 20", "Sample at step 20:"):
        assert line in proc.stdout
    adapter = tmp_path / "out" / "cli" / "my_adapter"
    assert f"LoRA written to {adapter}" in proc.stdout
    config_json = json.loads((adapter / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["base_model_name_or_path"] == str(tiny_llama)


def test_cli_folder_that_is_not_a_causal_lm_gives_one_clear_line(tiny_llama, chat_data, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = tmp_path / "clip"
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    CLIPTextModel(CLIPTextConfig(**tiny)).save_pretrained(clip)
    values = llm_values(clip, chat_data, tmp_path / "out")
    proc = run_cli("train", str(write_config(tmp_path / "llm.yaml", **values)))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = "holds a clip_text_model model (CLIPTextModel), not a causal language model"
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_target_module_that_does_not_exist_stops_the_job_before_writing(tiny_llama, chat_data, tmp_path):
    cfg = llm_config(tiny_llama, chat_data, tmp_path / "out", target_modules=["q_proj", "qkv"])
    with pytest.raises(ConfigError, match="target_modules: no module named 'qkv' in this model"):
        run_training(cfg)
    assert not (tmp_path / "out").exists()
