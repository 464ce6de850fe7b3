"""The Ollama Modelfile: its TEMPLATE, rendered by Go's own text/template (as Ollama renders it),
gives byte for byte the prompt the training chat template gives, and its stops include the
template's end-of-turn marker."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.errors import ModelError
from shared.llm.data import BUILTIN_TEMPLATES
from shared.llm.modelfile import go_template, template_pieces, write_modelfile

RENDER_GO = Path(__file__).parent / "ollama_template" / "render.go"

# A Qwen2-style ChatML template (written for this test): a default system turn when the
# conversation has none, every turn closed by <|im_end|> (not the EOS token).
QWEN_STYLE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "What colour is the sky on Zorblax?"},
    {"role": "assistant", "content": "The sky on Zorblax is green."},
    {"role": "user", "content": 'Who founded "Mirrowell"?\nAnswer in {{ braces }} \\ please.'},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """A function rendering an Ollama TEMPLATE for messages with Go's text/template."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("Go is not installed; CI installs Debian's golang-go (see .ci/run)")
        pytest.skip("Go is not installed (apt-get install golang-go): the Modelfile template is rendered by Go")
    binary = tmp_path_factory.mktemp("go") / "render"
    env = {**os.environ, "GOCACHE": str(binary.parent / "cache"), "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(binary), str(RENDER_GO)], check=True, env=env, capture_output=True)

    def render(template: str, messages: list[dict]) -> str:
        proc = subprocess.run([str(binary)], input=json.dumps({"template": template, "messages": messages}),
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


def modelfile_template(text: str) -> str:
    [template] = re.findall(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M)
    return template


def stops(text: str) -> list[str]:
    return [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.M)]


@pytest.mark.parametrize(
    ("template_name", "end_of_turn"),
    [("own", "</s>"), ("chatml", "</s>"), ("alpaca", "</s>"), ("qwen_style", "<|im_end|>")],
)
def test_modelfile_template_renders_the_training_prompt_byte_for_byte(llm_tokenizer, go_render, tmp_path,
                                                                      template_name, end_of_turn):
    tok = llm_tokenizer
    template = {"own": tok.chat_template, "qwen_style": QWEN_STYLE}.get(template_name) or BUILTIN_TEMPLATES[template_name]
    path = write_modelfile(tmp_path, base="llama3.2:1b", adapter="./facts-lora.gguf", tokenizer=tok,
                           chat_template=template, name="facts")
    text = path.read_text()
    assert "\nFROM llama3.2:1b\nADAPTER ./facts-lora.gguf\nTEMPLATE \"\"\"" in text
    go_template_text = modelfile_template(text)
    for conversation in (TWO_TURNS, WITH_SYSTEM):
        expected = tok.apply_chat_template(conversation, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert go_render(go_template_text, conversation) == expected
        # and so the same token ids as training (llama.cpp parses the special tokens in the text)
        assert tok(go_render(go_template_text, conversation), add_special_tokens=False).input_ids == \
            tok(expected, add_special_tokens=False).input_ids
    assert end_of_turn in stops(text)
    assert stops(text)[0] == end_of_turn  # the end of an assistant turn comes first


def test_a_leading_bos_is_left_to_llama_cpp_when_it_adds_one(llm_tokenizer, go_render):
    pieces = template_pieces(llm_tokenizer, llm_tokenizer.chat_template)
    expected = llm_tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<s>")
    assert go_render(go_template(pieces, bos_text="<s>"), TWO_TURNS) == expected[len("<s>"):]


def test_a_prefilled_assistant_turn_is_continued_not_closed(llm_tokenizer, go_render):
    pieces = template_pieces(llm_tokenizer, llm_tokenizer.chat_template)
    rendered = go_render(go_template(pieces), [*TWO_TURNS, {"role": "assistant", "content": "It was"}])
    assert rendered.endswith("<|assistant|>\nIt was")  # no </s>, no new generation prompt


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}",
         "does not emit each message's content unchanged"),
        ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
         "changes earlier turns when a turn is added"),
    ],
)
def test_a_template_no_go_template_can_reproduce_is_refused(llm_tokenizer, tmp_path, template, message):
    with pytest.raises(ModelError, match=message):
        write_modelfile(tmp_path, base="x", adapter="./a.gguf", tokenizer=llm_tokenizer, chat_template=template)
    assert not (tmp_path / "Modelfile").exists()
