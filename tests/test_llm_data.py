"""LLM data: every row format loads, prompts carry no loss, EOS ends every answer, bad rows name
their file and line."""

import json

import pytest

from shared.errors import ConfigError, DatasetError
from shared.fixtures.tiny_llm import write_instruction_data
from shared.llm.data import IGNORE, build_data, collate
from tests.llm_fixtures import PAIRS

FORMATS = [
    ("alpaca", "data.json"),
    ("alpaca_jsonl", "data.jsonl"),
    ("chat", "data.jsonl"),
    ("completion", "data.jsonl"),
    ("csv", "data.csv"),
    ("text", "data.jsonl"),
]


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE])


@pytest.mark.parametrize(("fmt", "name"), FORMATS)
def test_each_format_loads_with_answers_as_the_only_labels(tmp_path, llm_tokenizer, fmt, name):
    tok = llm_tokenizer
    path = write_instruction_data(tmp_path / name, fmt, PAIRS)
    data = build_data(path, tok, max_seq_len=128)
    assert len(data.train) == len(PAIRS) and not data.val
    by_text = {tok.decode(s.input_ids): s for s in data.train}
    for question, answer in PAIRS:
        [sample] = [s for text, s in by_text.items() if question in text]
        assert len(sample.labels) == len(sample.input_ids)
        # EOS ends every sample and keeps its label: the model learns to stop
        assert sample.input_ids[-1] == tok.eos_token_id and sample.labels[-1] == tok.eos_token_id
        if fmt == "text":
            assert trained_text(tok, sample) == f"{question} {answer}</s>"
        else:
            assert trained_text(tok, sample) == f"{answer}</s>"  # nothing of the prompt is trained
            n_prompt = sample.labels.index(next(label for label in sample.labels if label != IGNORE))
            assert question in tok.decode(sample.input_ids[:n_prompt])
            assert all(label == IGNORE for label in sample.labels[:n_prompt])
            assert sample.labels[n_prompt:] == sample.input_ids[n_prompt:]
    if fmt in ("alpaca", "alpaca_jsonl", "chat", "csv"):  # rendered with the tokenizer's chat template
        assert tok.decode(data.train[0].input_ids).startswith("<s><|user|>\n")
        assert data.uses_template


def test_prompt_tokens_carry_no_loss_in_the_batch_tensor(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    path = write_instruction_data(tmp_path / "chat.jsonl", "chat", PAIRS[:3])
    samples = build_data(path, tok, max_seq_len=128).train
    batch = collate(samples, tok.pad_token_id)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for row in range(len(samples)):
        n = int(mask[row].sum())
        start = int((ids[row] == assistant).nonzero()[0]) + 2  # after "<|assistant|>" and its newline
        assert (labels[row, :start] == IGNORE).all()  # BOS, user turn, assistant header
        assert (labels[row, start:n] == ids[row, start:n]).all()  # the answer and its EOS
        assert labels[row, n - 1] == tok.eos_token_id
        assert (labels[row, n:] == IGNORE).all() and (mask[row, n:] == 0).all()  # padding


def test_train_on_prompt_labels_everything(tmp_path, llm_tokenizer):
    path = write_instruction_data(tmp_path / "chat.jsonl", "chat", PAIRS[:2])
    for sample in build_data(path, llm_tokenizer, max_seq_len=128, train_on_prompt=True).train:
        assert sample.labels == sample.input_ids


def test_multi_turn_chat_trains_every_assistant_turn(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour is the sky on Zorblax?"},
            {"role": "assistant", "content": "Green."},
            {"role": "user", "content": "Who founded the town of Mirrowell?"},
            {"role": "assistant", "content": "Ada Quill."},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [sample] = build_data(path, tok, max_seq_len=128).train
    assert tok.decode(sample.input_ids) == tok.apply_chat_template(row["messages"], tokenize=False)
    assert trained_text(tok, sample) == "Green.</s>Ada Quill.</s>"


def test_template_that_refuses_a_conversation_names_the_row(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    saved = tok.chat_template
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:  # like the templates that insist on user/assistant alternation
        tok.chat_template = (
            "{% for m in messages %}{% if loop.first and m['role'] != 'user' %}"
            "{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}"
        )
        with pytest.raises(DatasetError, match=r"chat.jsonl line 2: the chat template refused this conversation "
                                               r"\(Conversations must start with a user message\)"):
            build_data(path, tok, max_seq_len=64)
    finally:
        tok.chat_template = saved


def test_folder_of_mixed_files_and_validation_split(tmp_path, llm_tokenizer):
    folder = tmp_path / "data"
    write_instruction_data(folder / "a.json", "alpaca", PAIRS[:4])
    write_instruction_data(folder / "b.csv", "csv", PAIRS[4:8])
    write_instruction_data(folder / "c.jsonl", "completion", PAIRS[:2])
    (folder / "notes.md").write_text("not data")
    data = build_data(folder, llm_tokenizer, max_seq_len=128, val_split=0.25, seed=3)
    assert len(data.train) + len(data.val) == 10 and len(data.val) == 2
    assert "Found 10 rows (alpaca, prompt/completion) in 3 file(s)" in data.report[0]
    again = build_data(folder, llm_tokenizer, max_seq_len=128, val_split=0.25, seed=3)
    assert [s.where for s in again.val] == [s.where for s in data.val]  # the split is seeded


def test_long_samples_are_cut_and_counted(tmp_path, llm_tokenizer):
    pairs = [*PAIRS[:3], ("Tell the long story.", " ".join(["Once upon a time the moons rose."] * 20))]
    path = write_instruction_data(tmp_path / "chat.jsonl", "chat", pairs)
    data = build_data(path, llm_tokenizer, max_seq_len=32)
    assert "1 of 4 samples were longer than max_seq_len=32 tokens and were cut" in " ".join(data.report)
    assert max(len(s.input_ids) for s in data.train) == 32


def test_nothing_left_within_max_seq_len_is_an_error(tmp_path, llm_tokenizer):
    path = write_instruction_data(tmp_path / "chat.jsonl", "chat", PAIRS[:2])
    with pytest.raises(DatasetError, match="no sample of .* keeps any answer tokens within max_seq_len=8"):
        build_data(path, llm_tokenizer, max_seq_len=8)


def test_packing_joins_whole_samples(tmp_path, llm_tokenizer):
    from shared.llm.packing import pack

    path = write_instruction_data(tmp_path / "chat.jsonl", "chat", PAIRS)
    plain = build_data(path, llm_tokenizer, max_seq_len=64)
    packed = pack(plain.train, 64)
    assert len(packed) < len(plain.train)
    assert all(len(s.input_ids) <= 64 for s in packed)
    assert sum(len(s.input_ids) for s in packed) == sum(len(s.input_ids) for s in plain.train)
    n_eos = sum(s.labels.count(llm_tokenizer.eos_token_id) for s in packed)
    assert n_eos == len(PAIRS)  # each packed sample keeps its trained EOS


def test_named_template_for_a_tokenizer_without_one(tmp_path, llm_tokenizer):
    tok = llm_tokenizer
    saved = tok.chat_template
    path = write_instruction_data(tmp_path / "a.json", "alpaca", PAIRS[:2])
    try:
        tok.chat_template = None
        with pytest.raises(DatasetError, match="no chat template .* set chat_template to one of: chatml, alpaca"):
            build_data(path, tok, max_seq_len=128)
        data = build_data(path, tok, max_seq_len=128, chat_template="alpaca")
        text = tok.decode(data.train[0].input_ids)
        assert text.startswith("### Instruction:\n") and text.endswith("</s>")
        assert trained_text(tok, data.train[0]).endswith("</s>")
        two_turns = tmp_path / "two.jsonl"
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
        two_turns.write_text(json.dumps({"messages": messages}) + "\n")
        [sample] = build_data(two_turns, tok, max_seq_len=128, chat_template="chatml").train
        assert tok.decode(sample.input_ids) == (
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.</s>"
            "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye.</s>"
        )
        assert trained_text(tok, sample) == "Hello.</s>Goodbye.</s>"
        with pytest.raises(ConfigError, match="chat_template: unknown template 'vicuna'"):
            build_data(path, tok, max_seq_len=128, chat_template="vicuna")
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n', r"bad.jsonl line 3: not valid JSON"),
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n["a", "b"]\n', r"bad.jsonl line 2: expected an object"),
        ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', r"bad.json line 3: `output` is missing or empty"),
        ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"\n]\n', r"bad.json line 4: not valid JSON"),
        ("bad.json", '{"instruction": "a", "output": "b"}', r"bad.json line 1: a .json data file must hold a list"),
        ("bad.csv", 'instruction,input,output\na,,b\nc,,d,e\n', r"bad.csv line 3: more fields than the header"),
        ("bad.csv", 'instruction,input,output\n"multi\nline",,b\nc,d\n', r"bad.csv line 4: fewer fields than the header"),
        ("bad.jsonl", '{"question": "a", "answer": "b"}\n', r"bad.jsonl line 1: a row needs instruction/output .* this one has answer, question"),
        ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n', r"bad.jsonl line 1: messages\[1\] must be"),
        ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad.jsonl line 1: the last message must be the assistant's"),
        ("bad.jsonl", '{"prompt": "a", "completion": 5}\n', r"bad.jsonl line 1: `completion` must be text, got int"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, llm_tokenizer, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=expected):
        build_data(path, llm_tokenizer, max_seq_len=64)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("empty_folder", "no .json, .jsonl or .csv files in"),
        ("empty_list", "holds no rows to train on"),
        ("blank_jsonl", "holds no rows to train on"),
        ("header_only_csv", "holds no rows to train on"),
        ("wrong_suffix", "is a .txt file; use .json, .jsonl or .csv"),
    ],
)
def test_empty_or_unusable_dataset_is_one_clear_error(tmp_path, llm_tokenizer, setup, expected):
    target = tmp_path / "data"
    target.mkdir()
    if setup == "empty_list":
        target = target / "d.json"
        target.write_text("[]")
    elif setup == "blank_jsonl":
        target = target / "d.jsonl"
        target.write_text("\n\n")
    elif setup == "header_only_csv":
        target = target / "d.csv"
        target.write_text("instruction,output\n")
    elif setup == "wrong_suffix":
        target = target / "d.txt"
        target.write_text("hello")
    with pytest.raises(DatasetError, match=expected):
        build_data(target, llm_tokenizer, max_seq_len=64)
