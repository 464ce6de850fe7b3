"""Packing: a row packed with others gets exactly the loss it gets alone (its attention stays inside it,
its positions restart), `packing: auto` decides by the rows' lengths and says why, a model that cannot
keep packed rows apart falls back, and packed training still learns the answers and the EOS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.fixtures.tiny_llm import write_instruction_data
from shared.llm.data import IGNORE, Sample, build_data
from shared.llm.loss import AnswerLoss, token_loss
from shared.llm.model import load_causal_lm, load_tokenizer
from shared.llm.packing import collate_packed, decide, pack
from shared.train import run_training
from tests.llm_fixtures import PAIRS, answers, llm_config
from tests.test_llm_training import Recorder


@pytest.fixture(scope="module")
def tiny_models(tiny_llama, tmp_path_factory):
    from shared.fixtures.tiny_llm import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("packing_models")
    return {"llama": tiny_llama, **{arch: build_tiny_causal_lm(root / arch, arch) for arch in ("qwen2", "mistral")}}


def text_rows(tmp_path, tokenizer) -> list[Sample]:
    """Plain-text rows, every token trained: the first token of each row has a label too, which a
    packed row must not be asked to predict from the row before it."""
    path = write_instruction_data(tmp_path / "rows.jsonl", "text", PAIRS)
    rows = build_data(path, tokenizer, max_seq_len=64).train
    assert all(r.labels[0] != IGNORE for r in rows)
    return rows


def per_row_losses(logits, batch, packed, flat: bool) -> list[torch.Tensor]:
    """Each row's summed next-token loss, read off a packed batch's logits."""
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                                reduction="none")
    sequences = [[n for p in packed for n in p.lengths]] if flat else [p.lengths for p in packed]
    out = []
    for b, lengths in enumerate(sequences):
        start = 0
        for n in lengths:
            out.append(per_token[b, start:start + n - 1].sum())  # the row's own predictions; the next one is masked
            start += n
    return out


@pytest.mark.parametrize("flat", [False, True], ids=["a-sequence-a-row", "flat"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_packed_row_has_the_loss_it_has_alone(tiny_models, tmp_path, arch, flat):
    folder = tiny_models[arch]
    tokenizer = load_tokenizer(folder, trust_remote_code=False)
    model = load_causal_lm(folder)
    rows = text_rows(tmp_path, tokenizer)
    packed = pack(rows, 64)
    assert len(packed) < len(rows) and any(len(p.lengths) > 2 for p in packed)
    assert all(len(p.input_ids) <= 64 for p in packed)
    batch = collate_packed(packed, tokenizer.pad_token_id, flat=flat)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == (1 if flat else len(packed))

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        got = per_row_losses(logits, batch, packed, flat)
        order = [r for p in packed for r in p.where.split("; ")]
        by_where = {r.where: r for r in rows}
        alone = [token_loss(model(input_ids=torch.tensor([by_where[w].input_ids])).logits,
                            torch.tensor([by_where[w].labels]))[0] for w in order]
        assert len(got) == len(alone) == len(rows)
        for mine, reference in zip(got, alone):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)

        # the training loss of the packed batch is the sum of the rows' losses alone
        loss = AnswerLoss(model, torch.device("cpu"))
        total, count = loss(model, batch)
        torch.testing.assert_close(total, torch.stack(alone).sum(), rtol=1e-4, atol=1e-4)
        assert int(count) == sum(len(r.input_ids) - 1 for r in rows)

        # control: the same tokens concatenated plainly (no restarting positions) let rows see each other
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
        assert not torch.allclose(torch.stack(per_row_losses(plain, batch, packed, flat)), torch.stack(alone),
                                  rtol=1e-3, atol=1e-3)


def test_pack_fills_sequences_whole_rows_each_once(tmp_path, llm_tokenizer):
    rows = [Sample(list(range(1, n + 1)), list(range(1, n + 1)), "", f"row {i}")
            for i, n in enumerate([50, 40, 30, 20, 14, 10, 9, 60, 5, 3])]
    packed = pack(rows, 64)
    assert sum(map(len, (p.input_ids for p in packed))) == sum(len(r.input_ids) for r in rows)
    assert sorted(w for p in packed for w in p.where.split("; ")) == sorted(r.where for r in rows)
    assert all(len(p.input_ids) <= 64 and sum(p.lengths) == len(p.input_ids) for p in packed)
    assert len(packed) == 4  # 241 tokens: best-fit decreasing needs the fewest sequences of 64 there are
    for p in packed:
        start = 0
        for n in p.lengths:
            assert p.labels[start] == IGNORE and p.labels[start + 1:start + n] == list(range(2, n + 1))
            start += n
    assert [p.where for p in pack(rows, 64)] == [p.where for p in packed]  # deterministic


def test_packing_auto_decides_by_the_median_row():
    rows = [Sample([1] * n, [1] * n, "", "") for n in (20, 24, 30, 200)]
    on = decide("auto", rows, max_seq_len=1024)
    assert on.on and on.reason.startswith("packing: auto -> on (median row 27 tokens, 3% of max_seq_len=1024")
    off = decide("auto", rows, max_seq_len=64)
    assert not off.on and off.reason.startswith("packing: auto -> off (median row 27 tokens, 42% of max_seq_len=64")
    assert "grouped by length" in off.reason
    assert decide(True, rows, 64).on and not decide(False, rows, 1024).on


def run_log(folder, data, tmp_path, **overrides) -> list[str]:
    rec = Recorder()
    run_training(llm_config(folder, data, tmp_path / "out", max_train_steps=1, sample_prompts=[PAIRS[0][0]],
                            sample_max_tokens=2, **overrides), rec)
    return rec.lines


def test_packing_auto_is_logged_with_its_reason(tiny_llama, tiny_glm, chat_data, tmp_path):
    # the chat rows are 21-25 tokens
    lines = run_log(tiny_llama, chat_data, tmp_path / "a", max_seq_len=128)
    assert any(line.startswith("packing: auto -> on (median row 23 tokens, 18% of max_seq_len=128") for line in lines)
    assert any(line.startswith("Packed 8 samples into 2 sequences of up to 128 tokens") for line in lines)
    lines = run_log(tiny_llama, chat_data, tmp_path / "b", max_seq_len=64)
    assert any(line.startswith("packing: auto -> off (median row 23 tokens, 36% of max_seq_len=64") for line in lines)
    assert not any(line.startswith("Packed") for line in lines)
    # a remote-code model that builds its own attention mask cannot keep packed rows apart: off, and why
    lines = run_log(tiny_glm, chat_data, tmp_path / "c", max_seq_len=128, trust_remote_code=True,
                    target_modules=["query_key_value"])
    [line] = [line for line in lines if line.startswith("packing:")]
    assert line.startswith("packing: auto -> off") and "does not keep packed rows apart" in line


@pytest.mark.slow
def test_packed_training_teaches_answers_and_eos(tiny_llama, chat_data, tmp_path):
    from peft import PeftModel

    rec = Recorder()
    result = run_training(llm_config(tiny_llama, chat_data, tmp_path / "out", max_seq_len=128, batch_size=2), rec)
    assert any(line.startswith("packing: auto -> on") for line in rec.lines)
    tokenizer = load_tokenizer(tiny_llama, trust_remote_code=False)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_llama), str(result.output_path))
    for gen, (_, answer) in zip(answers(model, tokenizer), PAIRS):
        assert gen.text == answer and gen.stopped and gen.token_ids[-1] == tokenizer.eos_token_id
