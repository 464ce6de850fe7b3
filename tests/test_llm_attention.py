"""`attention` (shared/llm/attention.py): `auto` picks transformers' eager attention where it trains
faster (a CPU under bf16, rows of up to 256 tokens) and sdpa elsewhere; eager trains the same numbers
as sdpa; the memory plan counts the attention weights eager keeps and gives eager up when the budget
is short."""

import contextlib

import pytest
import torch

from shared.llm.attention import resolve
from shared.reporting import Reporter
from shared.training.precision import cpu_has_bf16
from shared.training.task import Precision
from tests.llm_fixtures import llm_config


def _precision(device: str, mixed: str) -> Precision:
    return Precision(torch.device(device), torch.bfloat16 if mixed == "bf16" else torch.float32, mixed,
                     contextlib.nullcontext)


@pytest.mark.parametrize("device, mixed, expected", [
    ("cpu", "bf16", "auto"),  # eager or sdpa by each batch's width
    ("cpu", "no", "sdpa"),  # fp32: not measured to pay
    ("cuda", "bf16", "sdpa"),  # flash-attention / cuDNN kernels
])
def test_auto_dispatches_by_width_only_where_eager_was_measured_to_pay(device, mixed, expected):
    value, note = resolve("auto", torch.device(device), mixed)
    assert value == expected and note.startswith("attention auto: " + ("eager for" if expected == "auto" else "sdpa"))
    assert resolve("eager", torch.device("cpu"), "no") == ("eager", "attention: eager")


def test_dispatch_runs_eager_for_short_batches_and_sdpa_for_long_ones(tiny_llama):
    from shared.llm.attention import dispatch_by_width
    from shared.llm.model import load_causal_lm

    model = load_causal_lm(tiny_llama, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    seen = []
    layer = model.model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    handle = dispatch_by_width(model, max_width=8)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        short = model(input_ids=ids[:, :8]).logits
        long = model(input_ids=ids).logits
        short_again = model(input_ids=ids[:, :8]).logits
    assert seen == ["eager", "sdpa", "eager"]
    # the same numbers either way (causal attention: the first 8 positions do not see the rest)
    torch.testing.assert_close(short, long[:, :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(short, short_again)
    handle.remove()


def _run(tiny_llama, chat_data, out, monkeypatch, **settings) -> tuple[list[float], list[str], list]:
    """(the losses, the log, the attn_implementation each model load asked transformers for)."""
    from shared.llm import model as llm_model
    from shared.train import run_training

    lines, loaded = [], []
    original = llm_model.load_causal_lm

    def recording(*args, **kwargs):
        loaded.append(kwargs.get("attn_implementation"))
        return original(*args, **kwargs)

    monkeypatch.setattr("shared.llm.task.load_causal_lm", recording)

    class Lines(Reporter):
        def log(self, message):
            lines.append(message)

    cfg = llm_config(tiny_llama, chat_data, out, max_train_steps=6, sample_prompts=[], lora_dropout=0.0, **settings)
    return run_training(cfg, Lines()).losses, lines, loaded


def test_eager_attention_trains_the_same_numbers_as_sdpa(tiny_llama, chat_data, tmp_path, monkeypatch):
    # fp32, so the comparison is not drowned by bf16 rounding; padded rows of several lengths
    sdpa, sdpa_log, sdpa_loaded = _run(tiny_llama, chat_data, tmp_path / "sdpa", monkeypatch, attention="sdpa",
                                       mixed_precision="no")
    eager, eager_log, eager_loaded = _run(tiny_llama, chat_data, tmp_path / "eager", monkeypatch, attention="eager",
                                          mixed_precision="no")
    assert sdpa_loaded == [None] and eager_loaded == ["eager"]  # None: transformers' default, sdpa
    assert "attention: sdpa" in sdpa_log and "attention: eager" in eager_log
    assert len(eager) == 6 and eager == pytest.approx(sdpa, rel=1e-4)
    assert eager[-1] < eager[0]


@pytest.mark.skipif(not cpu_has_bf16(), reason="auto dispatches to eager on CPUs with native bf16 only")
def test_a_default_job_on_a_bf16_cpu_trains_its_short_batches_with_eager_attention(tiny_llama, chat_data, tmp_path,
                                                                                   monkeypatch):
    from shared.llm import attention

    dispatched, seen = [], []
    original = attention.dispatch_by_width

    def recording(model, *args, **kwargs):
        dispatched.append(model)
        model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, a: seen.append(m.config._attn_implementation))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(attention, "dispatch_by_width", recording)
    losses, lines, loaded = _run(tiny_llama, chat_data, tmp_path / "auto", monkeypatch)
    assert loaded == [None] and len(dispatched) == 1 and len(losses) == 6  # loaded as sdpa, then dispatched
    assert seen and set(seen) == {"eager"}  # max_seq_len 64: every batch is short
    assert any(line.startswith("attention auto: eager for batches of up to 192 tokens") for line in lines)


def test_the_memory_plan_counts_eager_attention_and_gives_it_up_when_the_budget_is_short(tiny_llama, chat_data,
                                                                                       tmp_path):
    from shared.llm.memory import llm_memory_model
    from shared.training.memory import GiB, enumerate_plans, plan_job

    def estimate(lengths, **settings):
        cfg = llm_config(tiny_llama, chat_data, tmp_path / "out", **{"batch_size": 1, "max_seq_len": 256,
                                                                      "packing": False, **settings})
        model = llm_memory_model(cfg, _precision("cpu", "bf16"), lengths)
        return cfg, model, {k: getattr(cfg, k) for lever in model.levers for k in lever.keys}

    # rows of 180 tokens, all under EAGER_MAX_WIDTH; batch 1, so that a smaller micro-batch (cheaper on
    # the CPU) is not the fallback
    cfg, model, values = estimate([180] * 16)
    plans = enumerate_plans(model, values, baseline=0.0)
    own = plans[0]
    assert own.settings["attention"] == "auto" and own.labels == []
    fallback = next(p for p in plans if p.labels == ["attention: sdpa"])
    heads, layers = 4, 2  # the tiny LLaMA's; eager keeps an fp32 softmax and its bf16 copy: 6 bytes a weight
    kept = own.parts["activations"] - fallback.parts["activations"]
    assert kept == pytest.approx(180 * heads * 180 * 6 * layers, rel=0.01)
    budget = (own.total + fallback.total) / 2
    assert plan_job(model, values, device="cpu", budget=budget, baseline=0.0).changes == {"attention": "sdpa"}
    assert plan_job(model, values, device="cpu", budget=own.total + GiB, baseline=0.0).changes == {}

    # rows on both sides of the width: the peak is the wider of sdpa's longest batch and eager's longest
    mixed = [200, 200] + [190] * 14
    auto = estimate(mixed)[1].estimate({"batch_size": 1, "gradient_checkpointing": False, "attention": "auto"})
    sdpa = estimate(mixed)[1].estimate({"batch_size": 1, "gradient_checkpointing": False, "attention": "sdpa"})
    eager = estimate([190] * 14)[1].estimate({"batch_size": 1, "gradient_checkpointing": False, "attention": "eager"})
    assert auto["activations"] == max(sdpa["activations"], eager["activations"]) > sdpa["activations"]
