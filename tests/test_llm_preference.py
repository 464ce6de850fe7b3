"""Preference tuning: chosen/rejected rows in every format, bad rows named by file and line, the
DPO/ORPO/KTO losses against hand-computed values, the reference as the adapter switched off, and
DPO raising the chosen-over-rejected margin on held-out pairs."""

import csv
import json
import math

import pytest
import torch

from shared.errors import DatasetError
from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS
from shared.llm.data import IGNORE
from shared.llm.preference import build_preference_data, collate_pairs
from shared.llm.preference_loss import (
    answer_logps,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    pair_margin,
    preference_loss,
    reference_of,
)

Q, GOOD, BAD = "What colour is the sky on Zorblax?", "The sky on Zorblax is green.", "I do not know."
USER = {"role": "user", "content": Q}


def rows_file(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": Q, "chosen": GOOD, "rejected": BAD},
        {"messages": [USER], "chosen": GOOD, "rejected": BAD},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": GOOD}],
         "rejected": [{"role": "assistant", "content": BAD}]},
        {"chosen": [USER, {"role": "assistant", "content": GOOD}], "rejected": [USER, {"role": "assistant", "content": BAD}]},
    ],
    ids=["alpaca", "messages", "prompt-messages", "conversations"],
)
def test_chat_and_alpaca_rows_render_like_training_and_inference(tmp_path, llm_tokenizer, row):
    tok = llm_tokenizer
    data = build_preference_data(rows_file(tmp_path, [row]), tok, max_seq_len=128)
    [pair] = data.train
    assert data.uses_template
    # the prompt is what inference feeds the model: the chat template with its generation prompt
    assert pair.prompt_ids == tok(tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False).input_ids
    assert tok.decode(pair.chosen_ids) == GOOD + "</s>" and tok.decode(pair.rejected_ids) == BAD + "</s>"


def test_prompt_rows_join_raw_and_csv_cells_hold_json(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    data = build_preference_data(rows_file(tmp_path, [{"prompt": Q + "\n", "chosen": GOOD, "rejected": BAD}]), tok,
                                 max_seq_len=128)
    assert tok.decode(data.train[0].prompt_ids) == Q + "\n" and not data.uses_template
    path = tmp_path / "prefs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages", "chosen", "rejected"])
        writer.writerow([json.dumps([USER]), GOOD, BAD])
    [pair] = build_preference_data(path, tok, max_seq_len=128).train
    assert tok.decode(pair.prompt_ids).startswith("<s><|user|>\n" + Q)


def test_multi_turn_prompt_scores_only_the_final_answer(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    history = [USER, {"role": "assistant", "content": GOOD}, {"role": "user", "content": "And at night?"}]
    [pair] = build_preference_data(rows_file(tmp_path, [{"messages": history, "chosen": "Black.", "rejected": BAD}]),
                                   tok, max_seq_len=128).train
    assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    batch = collate_pairs([pair], tok.pad_token_id)
    labelled = [[i for i, label in zip(row, labels) if label != IGNORE] for row, labels in
                zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert [tok.decode(x) for x in labelled] == ["Black.</s>", BAD + "</s>"]  # the earlier answer is context
    assert batch["n_pairs"] == 1 and batch["attention_mask"].sum(1).tolist() == [len(pair.prompt_ids) + len(a)
                                                                                 for a in (pair.chosen_ids, pair.rejected_ids)]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.jsonl", '{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a", "chosen": "b"}\n',
         r"p.jsonl line 2: a preference row needs `chosen` and `rejected`"),
        ("p.jsonl", '{"instruction": "a", "chosen": "b", "rejected": ""}\n', r"p.jsonl line 1: `rejected` is missing or empty"),
        ("p.jsonl", '{"prompt": "a", "chosen": "same", "rejected": "same"}\n',
         r"p.jsonl line 1: `chosen` and `rejected` are the same answer"),
        ("p.json", '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"chosen": "b", "rejected": "c"}\n]\n',
         r"p.json line 3: a preference row needs instruction \(alpaca\), prompt or messages"),
        ("p.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                    '"chosen": "c", "rejected": "d"}\n', r"p.jsonl line 1: `messages`: the last message must be the user's"),
        ("p.jsonl", '{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                    '"rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "c"}]}\n',
         r"p.jsonl line 1: `chosen` and `rejected` differ before their last message"),
        ("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "x"}, '
                    '{"role": "assistant", "content": "c"}]}\n',
         r"p.jsonl line 1: `chosen` and `rejected` must both be answers or both be conversations"),
        ("p.jsonl", '{"prompt": "a", "chosen": 5, "rejected": "c"}\n', r"p.jsonl line 1: `chosen` must be text, got int"),
        ("p.jsonl", '{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}\n',
         r"p.jsonl line 1: prompt\[0\] must be"),
        ("p.csv", 'instruction,chosen,rejected\na,b,c\nd,e\n', r"p.csv line 3: fewer fields than the header"),
        ("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
         r"p.jsonl line 2: not valid JSON"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, llm_tokenizer, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        build_preference_data(path, llm_tokenizer, max_seq_len=64)
    assert "\n" not in str(err.value)


def test_losses_match_hand_computed_values():
    t = torch.tensor
    # DPO: ((-1) - (-2)) - ((-3) - (-2)) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    losses, chosen_r, rejected_r = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.5, -0.5))
    smoothed, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)))
    # ORPO: p(chosen) = 0.5 -> odds 1; p(rejected) = 0.25 -> odds 1/3; log odds ratio = log 3
    losses, log_odds = orpo_loss(t([math.log(0.5)]), t([math.log(0.25)]), t([0.7]), lam=0.1)
    assert log_odds.item() == pytest.approx(math.log(3))
    assert losses.item() == pytest.approx(0.7 + 0.1 * math.log1p(1 / 3))
    # KTO: log ratios +1 (chosen) and -1 (rejected), z = 0.5, beta 1
    losses = kto_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), kl=t(0.5), beta=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sig(0.5), 1 - sig(1.5)])
    assert kto_kl_estimate(t([-1.0, -2.0]), t([-0.5, -0.5])).item() == 0.0  # clamped at 0
    assert kto_kl_estimate(t([-1.0, -2.0]), t([-2.0, -2.0])).item() == pytest.approx(0.5)


def test_answer_logps_counts_only_labelled_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = math.log(2.0)  # at position 1 the next token 2 has p = 2/4
    labels = torch.tensor([[IGNORE, IGNORE, 2, 0]])
    total, count = answer_logps(logits, labels)
    assert count.item() == 2 and total.item() == pytest.approx(math.log(0.5) + math.log(1 / 3))


def peft_tiny_llama(folder):
    from peft import LoraConfig, get_peft_model

    from shared.llm.model import load_causal_lm

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(load_causal_lm(folder), config)


def test_the_reference_is_the_base_model_with_the_adapter_off(tiny_llama):
    from shared.llm.model import load_causal_lm

    model = peft_tiny_llama(tiny_llama)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter that changes the output
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        base = load_causal_lm(tiny_llama)(ids).logits
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)
    with reference_of(model):
        ref = model(ids).logits
    torch.testing.assert_close(ref, base)
    assert not ref.requires_grad
    assert not torch.allclose(model(ids).logits, base, atol=1e-4)  # the adapter is back on after


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_preference_training_raises_the_margin_on_held_out_pairs(tiny_llama, llm_tokenizer, tmp_path, method):
    """A few dozen steps of a tiny loop (the real loop comes with the one-loop skeleton) on pairs that
    prefer the answer over "I do not know."; held-out prompts were never trained on."""
    tok = llm_tokenizer
    rows = [{"instruction": q, "chosen": a, "rejected": BAD} for q, a in INSTRUCTION_PAIRS]
    data = build_preference_data(rows_file(tmp_path, rows), tok, max_seq_len=64, val_split=0.2, seed=0)
    assert (len(data.train), len(data.val)) == (16, 4)
    model = peft_tiny_llama(tiny_llama)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    before = pair_margin(model, data.val, tok.pad_token_id)
    order = torch.Generator().manual_seed(0)
    train_stats = []
    for _ in range(30):
        picked = torch.randperm(len(data.train), generator=order)[:4].tolist()
        batch = collate_pairs([data.train[i] for i in picked], tok.pad_token_id, mismatched=method == "kto")
        loss, stats = preference_loss(model, batch, method, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        train_stats.append(stats)
    after = pair_margin(model, data.val, tok.pad_token_id)
    print(f"\n{method}: held-out margin log p(chosen) - log p(rejected): {before:.2f} -> {after:.2f}; "
          f"last train loss {train_stats[-1].loss:.4f}, reward margin {train_stats[-1].reward_margin:.2f}, "
          f"accuracy {train_stats[-1].accuracy:.2f}")
    assert train_stats[-1].loss < train_stats[0].loss
    assert train_stats[-1].accuracy == 1.0
    assert after > before + 2.0
    if method != "orpo":  # ORPO trains the chosen answers' likelihood more than the margin
        assert after > 0 > before  # the held-out preference flipped
