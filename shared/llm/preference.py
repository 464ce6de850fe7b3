"""Preference data for DPO / ORPO / KTO: a prompt with a chosen and a rejected answer.

Rows are read by shared/llm/data.py's readers (JSON list, JSONL, CSV; every error names its file and
line) and rendered by its `Renderer`, so a preference pair sees exactly the text SFT training and
inference see. Row formats, detected per row by its fields:

- alpaca style: `instruction` (+ optional `input`, `system`), `chosen`, `rejected` (texts): a one-turn
  chat through the chat template, as SFT's alpaca rows.
- prompt style: `prompt`, `chosen`, `rejected` (texts): joined as they are, no template, as SFT's
  prompt/completion rows.
- chat style: the prompt as messages (`prompt` as a list, or `messages`) ending with the user's turn,
  and `chosen` / `rejected` as texts or as assistant messages; or `chosen` and `rejected` as two whole
  conversations that share everything but their last (assistant) message. A CSV cell holds a list as
  JSON.

Each pair becomes prompt ids (everything before the final answer, as inference renders it) and the
ids of each answer, ending with the EOS token (kept, so preference training also teaches stopping).
Only the final answer is scored: earlier assistant turns of a chat prompt are context.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import DatasetError
from shared.llm.data import (
    IGNORE,
    Parsed,
    Record,
    Renderer,
    _text_field,
    parse_message_list,
    read_records,
    resolve_template,
)

ANSWER_KEYS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    val: list[PreferencePair]
    uses_template: bool
    renderer: Renderer
    report: list[str] = field(default_factory=list)


def _as_messages(rec: Record, key: str) -> list[dict] | None:
    """`rec[key]` as a message list when it is one (a list, or in a CSV cell a JSON list), else None."""
    value = rec.data.get(key)
    if isinstance(value, str) and rec.file.suffix.lower() == ".csv" and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list):
        return parse_message_list(Record(rec.file, rec.line, {key: value}), key, last=None)
    return None


def _answer(rec: Record, key: str) -> str | list[dict]:
    """A chosen/rejected answer: its text, or (for whole conversations) its message list."""
    if rec.data.get(key) is None or rec.data.get(key) == "":
        raise DatasetError(f"{rec.where}: `{key}` is missing or empty")
    messages = _as_messages(rec, key)
    if messages is None:
        return _text_field(rec, key)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DatasetError(f"{rec.where}: `{key}` must end with a non-empty assistant message")
    if len(messages) == 1:
        return messages[0]["content"]
    return messages


def parse_preference(rec: Record) -> tuple[Parsed, Parsed]:
    """The chosen and the rejected conversation of one row, sharing their prompt."""
    keys = set(rec.data)
    missing = [k for k in ANSWER_KEYS if k not in keys]
    if missing:
        raise DatasetError(
            f"{rec.where}: a preference row needs `chosen` and `rejected` (plus instruction, prompt or messages); "
            f"this one has {', '.join(sorted(map(str, keys))) or 'no fields'}"
        )
    chosen, rejected = _answer(rec, "chosen"), _answer(rec, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DatasetError(f"{rec.where}: `chosen` and `rejected` must both be answers or both be conversations")

    if isinstance(chosen, list):  # two whole conversations: the prompt is what they share
        if "prompt" in keys or "messages" in keys or "instruction" in keys:
            raise DatasetError(f"{rec.where}: whole `chosen`/`rejected` conversations already hold the prompt; "
                               "drop prompt/messages/instruction, or give only the answers")
        if chosen[:-1] != rejected[:-1]:
            raise DatasetError(f"{rec.where}: `chosen` and `rejected` differ before their last message; "
                               "they must share the whole prompt")
        prompt, chosen, rejected = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
        if not prompt or prompt[-1]["role"] != "user":
            raise DatasetError(f"{rec.where}: the shared prompt of `chosen`/`rejected` must end with a user message")
        kind = "chat"
    elif "instruction" in keys:
        instruction = _text_field(rec, "instruction")
        extra = _text_field(rec, "input", required=False)
        system = _text_field(rec, "system", required=False)
        prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
        if system.strip():
            prompt.insert(0, {"role": "system", "content": system})
        kind = "chat"
    elif "messages" in keys or isinstance(rec.data.get("prompt"), list) or _as_messages(rec, "prompt") is not None:
        key = "messages" if "messages" in keys else "prompt"
        prompt = _as_messages(rec, key)
        if prompt is None:
            raise DatasetError(f"{rec.where}: `{key}` must be a list of {{role, content}} messages")
        if prompt[-1]["role"] != "user":
            raise DatasetError(f"{rec.where}: `{key}`: the last message must be the user's (got {prompt[-1]['role']!r})")
        kind = "chat"
    elif "prompt" in keys:
        prompt = _text_field(rec, "prompt")
        kind = "completion"
    else:
        raise DatasetError(
            f"{rec.where}: a preference row needs instruction (alpaca), prompt or messages beside chosen/rejected"
        )
    if chosen == rejected:
        raise DatasetError(f"{rec.where}: `chosen` and `rejected` are the same answer; nothing to prefer")
    if kind == "completion":
        return (Parsed("completion", "prompt", prompt=prompt, completion=chosen),
                Parsed("completion", "prompt", prompt=prompt, completion=rejected))
    fmt = "alpaca" if "instruction" in keys else "chat"
    return (Parsed("chat", fmt, messages=[*prompt, {"role": "assistant", "content": chosen}]),
            Parsed("chat", fmt, messages=[*prompt, {"role": "assistant", "content": rejected}]))


def _prompt_and_answer(renderer: Renderer, parsed: Parsed, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, final answer ids ending with EOS), tokenized piece by piece as in training."""
    pieces, _ = renderer.segments(parsed, where)
    prompt_ids = [] if parsed.kind == "chat" else list(renderer.raw_prefix)
    for text, _trained in pieces[:-1]:
        prompt_ids += renderer._ids(text)
    answer = renderer._ids(pieces[-1][0])
    if renderer.eos not in answer:
        answer.append(renderer.eos)
    return prompt_ids, answer


def build_preference_data(
    path: Path,
    tokenizer,
    *,
    max_seq_len: int,
    chat_template: str | None = None,
    val_split: float = 0.0,
    seed: int = 0,
    model_name: str = "",
) -> PreferenceData:
    """Read, validate, render and tokenize preference rows; cut long answers; hold out a split."""
    records = read_records(path)
    template = resolve_template(tokenizer, chat_template)
    hint = f" (the tokenizer in {model_name})" if model_name else ""
    renderer = Renderer(tokenizer, template, template_hint=hint)
    pairs: list[PreferencePair] = []
    uses_template = False
    cut = dropped = 0
    for rec in records:
        chosen, rejected = parse_preference(rec)
        uses_template |= chosen.kind == "chat"
        prompt, good = _prompt_and_answer(renderer, chosen, rec.where)
        prompt_r, bad = _prompt_and_answer(renderer, rejected, rec.where)
        if prompt != prompt_r:
            raise DatasetError(f"{rec.where}: the chat template renders the prompt differently before each answer")
        room = max_seq_len - len(prompt)
        if room < 1:
            dropped += 1
            continue
        if len(good) > room or len(bad) > room:
            cut += 1
            good, bad = good[:room], bad[:room]
            if good == bad:
                dropped += 1  # the answers differed only past the cut
                continue
        pairs.append(PreferencePair(prompt, good, bad, rec.where))

    files = sorted({str(rec.file) for rec in records})
    report = [f"Found {len(records)} preference pairs in {len(files)} file(s) under {path}"]
    if cut or dropped:
        report.append(
            f"{cut} pairs had answers cut at max_seq_len={max_seq_len} tokens; {dropped} had no difference "
            "left (or no room for an answer) and were dropped"
        )
    if not pairs:
        raise DatasetError(f"train_data_dir: no preference pair of {path} fits max_seq_len={max_seq_len}; raise it")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * val_split)) if val_split > 0 else 0
    if n_val >= len(pairs):
        raise DatasetError(f"val_split: {val_split} of {len(pairs)} pairs leaves nothing to train on; lower val_split")
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    if val:
        report.append(f"Held out {len(val)} pairs for validation, training on {len(train)}")
    return PreferenceData(train, val, uses_template, renderer, report)


def collate_pairs(pairs: list[PreferencePair], pad_id: int, *, mismatched: bool = False) -> dict:
    """A batch of right-padded rows: the B chosen sequences, then the B rejected ones, then (with
    `mismatched`, for KTO's KL estimate) each prompt followed by the next pair's chosen answer.
    `labels` holds the answer tokens (-100 on prompt and padding); `n_pairs` is B."""
    import torch

    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    if mismatched:
        rows += [(p.prompt_ids, pairs[(i + 1) % len(pairs)].chosen_ids) for i, p in enumerate(pairs)]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer)
        labels[r, len(prompt):n] = torch.tensor(answer)
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_pairs": len(pairs)}
