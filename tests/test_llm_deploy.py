"""Deploying an LLM adapter: the llama.cpp/Ollama files, text-generation-webui's loras folder (never
over an existing adapter), the fields vLLM's loader reads, and a GGUF base model refused up front."""

import json
import re
from pathlib import Path

import pytest
import torch

from shared.errors import ConfigError, ModelError
from shared.gguf_base import refuse_gguf_base
from shared.llm.deploy import (
    VLLM_REQUIRED,
    check_ollama_settings,
    check_vllm,
    place_in_textgen,
    vllm_problems,
    write_llama_cpp_files,
)
from shared.llm.gguf_export import write_model_gguf


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    """A PEFT adapter folder as the trainer writes it (adapter + tokenizer)."""
    from peft import LoraConfig, get_peft_model

    from shared.llm.lora import default_targets, peft_target_spec
    from shared.llm.model import load_causal_lm, load_tokenizer

    folder = tmp_path_factory.mktemp("adapter") / "facts"
    model = load_causal_lm(tiny_llama)
    targets = peft_target_spec(model, default_targets(model))
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")).save_pretrained(str(folder))
    load_tokenizer(tiny_llama, False).save_pretrained(str(folder))
    return folder


def test_llama_cpp_files_land_together(adapter, tiny_llama, llm_tokenizer, tmp_path):
    out = write_llama_cpp_files(tmp_path, adapter_dir=adapter, base_model=tiny_llama, stem="facts",
                                tokenizer=llm_tokenizer, chat_template=llm_tokenizer.chat_template, base_gguf=True)
    assert out == {"gguf_adapter": tmp_path / "facts-lora.gguf", "gguf_base": tmp_path / "tiny-llama-f16.gguf",
                   "modelfile": tmp_path / "Modelfile"}
    text = out["modelfile"].read_text()
    assert re.search(r"^FROM \./tiny-llama-f16\.gguf$", text, re.M) and re.search(r"^ADAPTER \./facts-lora\.gguf$", text, re.M)
    named = write_llama_cpp_files(tmp_path / "named", adapter_dir=adapter, base_model=tiny_llama, stem="facts",
                                  tokenizer=llm_tokenizer, chat_template=llm_tokenizer.chat_template,
                                  ollama_from="hf.co/someone/tiny-llama-GGUF:F16")
    assert "gguf_base" not in named and "FROM hf.co/someone/tiny-llama-GGUF:F16\n" in named["modelfile"].read_text()


def test_ollama_settings_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="ollama_base: the Modelfile needs a FROM"):
        check_ollama_settings(None, False, "{{ x }}")
    with pytest.raises(ConfigError, match="chat_template: the Modelfile's TEMPLATE is derived from"):
        check_ollama_settings("llama3.2:1b", False, None)


def test_textgen_gets_a_new_folder_and_never_replaces_one(adapter, tmp_path):
    (adapter / "facts-lora.gguf").write_bytes(b"GGUF")  # beside the PEFT files, for other hosts
    webui = tmp_path / "text-generation-webui"
    (webui / "user_data" / "loras" / "facts").mkdir(parents=True)
    theirs = webui / "user_data" / "loras" / "facts" / "adapter_config.json"
    theirs.write_text('{"mine": true}')
    first = place_in_textgen(adapter, webui, "facts")
    second = place_in_textgen(adapter, webui, "facts")
    assert (first.name, second.name) == ("facts_2", "facts_3")
    assert theirs.read_text() == '{"mine": true}'  # the user's adapter is untouched
    for folder in (first, second):
        assert (folder / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
        assert (folder / "tokenizer_config.json").is_file() and not list(folder.glob("*.gguf"))
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    (adapter / "facts-lora.gguf").unlink()

    old_layout = tmp_path / "old-webui"
    (old_layout / "loras").mkdir(parents=True)
    assert place_in_textgen(adapter, old_layout, "facts") == old_layout / "loras" / "facts"
    with pytest.raises(ConfigError, match="textgen_dir: .* is neither a text-generation-webui folder"):
        place_in_textgen(adapter, tmp_path / "nowhere", "facts")


def test_the_peft_folder_has_every_field_vllm_reads(adapter, tmp_path):
    import shutil

    config = json.loads((adapter / "adapter_config.json").read_text())
    for key in (*VLLM_REQUIRED, "base_model_name_or_path", "bias", "use_rslora", "use_dora", "modules_to_save"):
        assert key in config, key
    assert config["bias"] == "none" and not config["use_dora"] and not config["modules_to_save"]
    assert vllm_problems(adapter) == []
    check_vllm(adapter)

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config.update(r=32, use_dora=True, bias="lora_only")
    del config["target_modules"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    problems = vllm_problems(bad)
    assert problems == [
        "adapter_config.json lacks target_modules",
        "bias='lora_only': vLLM loads no adapter biases",
        "use_dora: vLLM does not support DoRA",
        "rank 32 is above vLLM's --max-lora-rank 16; start vLLM with a larger one",
    ]
    assert vllm_problems(bad, max_lora_rank=64)[-1] == "use_dora: vLLM does not support DoRA"
    with pytest.raises(ModelError, match="vLLM: .* would not load: adapter_config.json lacks target_modules"):
        check_vllm(bad)


def test_a_gguf_base_model_is_refused_with_one_line(tiny_llama, tmp_path):
    gguf_file = write_model_gguf(tiny_llama, tmp_path / "Tiny-Llama-Q4_K_M.gguf")
    with pytest.raises(ModelError) as err:
        refuse_gguf_base(gguf_file)
    message = str(err.value)
    assert message.startswith(f"base_model: {gguf_file} is a GGUF file (this one says it is tiny-llama)")
    assert "needs the model's Transformers weights" in message and "\n" not in message
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(gguf_file.read_bytes())
    with pytest.raises(ModelError, match=r"base_model: .*model\.gguf is a GGUF file"):
        refuse_gguf_base(folder)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(gguf_file.read_bytes())  # recognised by its magic, whatever its name
    with pytest.raises(ModelError, match="is a GGUF file"):
        refuse_gguf_base(renamed)
    refuse_gguf_base(tiny_llama)  # a Transformers folder passes
