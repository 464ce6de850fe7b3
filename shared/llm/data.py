"""LLM training data: reading JSON/JSONL/CSV rows, rendering them to tokens, masking the prompt.

Row formats (detected per row, by its keys):
- alpaca: `instruction`, optional `input`, `output` (optional `system`): rendered as a one-turn chat
  (user = instruction + blank line + input) with the chat template, so training and inference see
  the same text.
- chat: `messages`, a list of `{role, content}` (roles system/user/assistant) ending with the
  assistant; every assistant turn is trained.
- prompt/completion: `prompt` and `completion` (or `response`), joined as they are, no template.
- plain text: `text`, every token trained.

A sample is a list of segments (text, trained?) tokenized one by one and joined: that is how
inference sees it too (the prompt is tokenized alone, then the model writes the answer). Prompt
tokens get label -100 unless `train_on_prompt`; the EOS token ends every trained answer, with its
label kept, so the model learns to stop.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError, DatasetError

DATA_SUFFIXES = (".json", ".jsonl", ".csv")
ROLES = ("system", "user", "assistant")
IGNORE = -100

# Named templates for tokenizers without one (`chat_template: chatml`). Every assistant turn ends
# with the tokenizer's EOS token and nothing after it (separators open the next turn instead), so
# the model learns to stop exactly where generation stops.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\n\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass
class Record:
    """One row as read from a file, with where it came from (for error messages)."""

    file: Path
    line: int
    data: dict

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


@dataclass
class Sample:
    """One tokenized training sample."""

    input_ids: list[int]
    labels: list[int]
    prompt_text: str  # the rendered prompt before the last answer: a default sample prompt
    where: str


@dataclass
class LLMData:
    train: list[Sample]
    val: list[Sample]
    uses_template: bool  # chat/alpaca rows were rendered with a chat template
    renderer: Renderer  # renders sample prompts the way the data was rendered
    report: list[str] = field(default_factory=list)
    unpacked_train: list[Sample] = field(default_factory=list)  # before packing: their prompts


# ---------------------------------------------------------------------------------------------
# Reading files


def data_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DatasetError(f"train_data_dir: {path} is a {path.suffix or 'suffix-less'} file; use .json, .jsonl or .csv")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DatasetError(f"train_data_dir: no .json, .jsonl or .csv files in {path}")
    return files


def read_records(path: Path) -> list[Record]:
    """All rows of a data file or of the data files in a folder (sorted by name)."""
    records: list[Record] = []
    for file in data_files(path):
        suffix = file.suffix.lower()
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if suffix == ".jsonl":
            records += _read_jsonl(file, text)
        elif suffix == ".json":
            records += _read_json(file, text)
        else:
            records += _read_csv(file, text)
    if not records:
        raise DatasetError(f"train_data_dir: {path} holds no rows to train on")
    return records


def _read_jsonl(file: Path, text: str) -> list[Record]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{file} line {n}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        out.append(_as_record(file, n, row))
    return out


def _read_json(file: Path, text: str) -> list[Record]:
    """A JSON list of objects; each object's line number is where it starts."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def fail(pos: int, what: str):
        raise DatasetError(f"{file} line {line_of(pos)}: {what}")

    pos = _skip_ws(text, 0)
    if pos >= len(text):
        return []
    if text[pos] != "[":
        fail(pos, "a .json data file must hold a list of rows ([{...}, {...}]); use .jsonl for one row a line")
    pos = _skip_ws(text, pos + 1)
    out = []
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            fail(exc.pos, f"not valid JSON ({exc.msg})")
        out.append(_as_record(file, line_of(pos), row))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            break
        fail(pos, "not valid JSON (expected ',' or ']' after a row)")
    if _skip_ws(text, pos + 1) < len(text):
        fail(_skip_ws(text, pos + 1), "not valid JSON (text after the closing ']')")
    return out


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(file: Path, text: str) -> list[Record]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        return []
    out = []
    start = reader.line_num + 1
    try:
        for row in reader:
            if None in row:
                raise DatasetError(f"{file} line {start}: more fields than the header has columns")
            if any(value is None for value in row.values()):
                raise DatasetError(f"{file} line {start}: fewer fields than the header has columns")
            if any(v.strip() for v in row.values()):
                out.append(Record(file, start, {k.strip(): v for k, v in row.items()}))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DatasetError(f"{file} line {reader.line_num}: not valid CSV ({exc})") from None
    return out


def _as_record(file: Path, line: int, row) -> Record:
    if not isinstance(row, dict):
        raise DatasetError(f"{file} line {line}: expected an object with fields, got {type(row).__name__}")
    return Record(file, line, row)


# ---------------------------------------------------------------------------------------------
# Row formats


@dataclass
class Parsed:
    kind: str  # how it renders: chat | completion | text
    fmt: str  # what the row was: alpaca | chat | prompt/completion | text
    messages: list[dict] | None = None
    prompt: str = ""
    completion: str = ""


def _text_field(rec: Record, key: str, *, required: bool = True) -> str:
    value = rec.data.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise DatasetError(f"{rec.where}: `{key}` is missing or empty")
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{rec.where}: `{key}` must be text, got {type(value).__name__}")
    return value


def parse_record(rec: Record) -> Parsed:
    keys = set(rec.data)
    if "messages" in keys:
        return Parsed("chat", "chat", messages=_parse_messages(rec))
    if "instruction" in keys or "output" in keys:
        instruction = _text_field(rec, "instruction")
        extra = _text_field(rec, "input", required=False)
        output = _text_field(rec, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = _text_field(rec, "system", required=False)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return Parsed("chat", "alpaca", messages=messages)
    if "prompt" in keys:
        answer_key = "completion" if "completion" in keys or "response" not in keys else "response"
        return Parsed("completion", "prompt/completion", prompt=_text_field(rec, "prompt"), completion=_text_field(rec, answer_key))
    if "text" in keys:
        return Parsed("text", "text", completion=_text_field(rec, "text"))
    raise DatasetError(
        f"{rec.where}: a row needs instruction/output (alpaca), messages (chat), prompt/completion "
        f"or text; this one has {', '.join(sorted(map(str, keys))) or 'no fields'}"
    )


def _parse_messages(rec: Record) -> list[dict]:
    return parse_message_list(rec, "messages")


def parse_message_list(rec: Record, key: str, *, last: str | None = "assistant") -> list[dict]:
    """`rec[key]` as a list of {role, content} messages (a CSV cell may hold it as JSON), ending with
    a message of role `last` (None: any); one file:line error otherwise."""
    raw = rec.data[key]
    if isinstance(raw, str):  # a CSV cell holding JSON
        try:
            raw = json.loads(raw)
        except ValueError:
            raise DatasetError(f"{rec.where}: `{key}` is not a JSON list of messages") from None
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{rec.where}: `{key}` must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DatasetError(
                f"{rec.where}: {key}[{i}] must be {{\"role\": system|user|assistant, \"content\": text}}, "
                f"got {json.dumps(msg)[:80]}"
            )
        out.append({"role": msg["role"], "content": msg["content"]})
    field_note = "" if key == "messages" else f"`{key}`: "
    if last is not None and out[-1]["role"] != last:
        what = "the assistant's answer" if last == "assistant" else f"a {last} message"
        raise DatasetError(f"{rec.where}: {field_note}the last message must be {what} (got {out[-1]['role']!r})")
    if last == "assistant" and not out[-1]["content"].strip():
        raise DatasetError(f"{rec.where}: {field_note}the assistant's answer is empty")
    return out


# ---------------------------------------------------------------------------------------------
# Rendering and tokenizing


def resolve_template(tokenizer, name: str | None) -> str | None:
    """The chat template to use: the named built-in, else the tokenizer's own (None if it has none)."""
    if name is None:
        return getattr(tokenizer, "chat_template", None) or None
    if name not in BUILTIN_TEMPLATES:
        raise ConfigError(f"chat_template: unknown template {name!r}; choose one of {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[name]


class Renderer:
    """Turns parsed rows (and sample prompts) into tokens the same way for training and inference."""

    def __init__(self, tokenizer, template: str | None, train_on_prompt: bool = False, template_hint: str = ""):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_prompt = train_on_prompt
        self.template_hint = template_hint
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        # Raw text gets the BOS only where the tokenizer itself adds one (LLaMA does, GPT-2 does not).
        self.raw_prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []

    def _chat(self, messages, *, generation_prompt: bool, where: str = "sample_prompts") -> str:
        if self.template is None:
            raise DatasetError(
                f"the tokenizer has no chat template for chat/alpaca rows{self.template_hint}; "
                f"set chat_template to one of: {', '.join(BUILTIN_TEMPLATES)}"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # templates raise their own errors (e.g. "roles must alternate")
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DatasetError(f"{where}: the chat template refused this conversation ({detail})") from None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def segments(self, parsed: Parsed, where: str) -> tuple[list[tuple[str, bool]], str]:
        """(text, trained) pieces of one sample, and the prompt before its last answer."""
        if parsed.kind == "completion":
            return [(parsed.prompt, False), (parsed.completion, True)], parsed.prompt
        if parsed.kind == "text":
            return [(parsed.completion, True)], ""
        messages = parsed.messages
        pieces: list[tuple[str, bool]] = []
        done = ""
        prompt = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._chat(messages[:i], generation_prompt=True, where=where)
            after = self._chat(messages[: i + 1], generation_prompt=False, where=where)
            if not (before.startswith(done) and after.startswith(before)):
                raise DatasetError(
                    f"{where}: the chat template does not render this conversation turn by turn "
                    "(an earlier part changes when a later turn is added); use a different chat_template"
                )
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            prompt, done = before, after
        return pieces, prompt

    def encode(self, parsed: Parsed, where: str) -> tuple[list[int], list[int], str]:
        pieces, prompt = self.segments(parsed, where)
        ids: list[int] = [] if parsed.kind == "chat" else list(self.raw_prefix)
        labels: list[int] = [IGNORE] * len(ids)
        answer_has_eos = False
        for text, trained in pieces:
            piece = self._ids(text)
            ids += piece
            labels += piece if (trained or self.train_on_prompt) else [IGNORE] * len(piece)
            if trained:
                answer_has_eos = self.eos in piece
        if not answer_has_eos:
            ids.append(self.eos)
            labels.append(self.eos)
        return ids, labels, prompt

    def prompt_ids(self, prompt: str, *, as_chat: bool) -> list[int]:
        """Token ids for a sample prompt, rendered as the training data was."""
        if as_chat:
            return self._ids(self._chat([{"role": "user", "content": prompt}], generation_prompt=True))
        return list(self.raw_prefix) + self._ids(prompt)

    def rendered_prompt_ids(self, rendered: str, *, as_chat: bool) -> list[int]:
        """Token ids for a prompt already rendered (a training sample's own prompt)."""
        return self._ids(rendered) if as_chat else list(self.raw_prefix) + self._ids(rendered)


def build_data(
    path: Path,
    tokenizer,
    *,
    max_seq_len: int,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    val_split: float = 0.0,
    seed: int = 0,
    model_name: str = "",
) -> LLMData:
    """Read, render, tokenize, cut and split the training data."""
    records = read_records(path)
    parsed = [(rec, parse_record(rec)) for rec in records]
    uses_template = any(p.kind == "chat" for _, p in parsed)
    template = resolve_template(tokenizer, chat_template)
    hint = f" (the tokenizer in {model_name})" if model_name else ""
    renderer = Renderer(tokenizer, template, train_on_prompt, template_hint=hint)

    samples: list[Sample] = []
    cut = dropped = 0
    for rec, p in parsed:
        ids, labels, prompt = renderer.encode(p, rec.where)
        if len(ids) > max_seq_len:
            cut += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE for label in labels):
                dropped += 1  # nothing left to learn from: the whole answer was past the cut
                continue
        samples.append(Sample(ids, labels, prompt, rec.where))

    kinds = sorted({p.fmt for _, p in parsed})
    files = sorted({str(rec.file) for rec in records})
    report = [f"Found {len(records)} rows ({', '.join(kinds)}) in {len(files)} file(s) under {path}"]
    if cut:
        report.append(
            f"{cut} of {len(records)} samples were longer than max_seq_len={max_seq_len} tokens and were cut"
            + (f"; {dropped} of them had no answer left and were dropped" if dropped else "")
        )
    if not samples:
        raise DatasetError(
            f"train_data_dir: no sample of {path} keeps any answer tokens within max_seq_len={max_seq_len}; "
            "raise max_seq_len"
        )

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_split > 0:
        n_val = max(1, round(len(samples) * val_split))
        if n_val >= len(samples):
            raise DatasetError(
                f"val_split: {val_split} of {len(samples)} samples leaves nothing to train on; lower val_split"
            )
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    if val:
        report.append(f"Held out {len(val)} samples for validation, training on {len(train)}")
    # packing is decided with the loaded model (shared/llm/packing.py), which packs `train` in place
    return LLMData(train, val, uses_template, renderer, report, list(train))


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-pad a batch: padding gets attention 0 and label -100."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
