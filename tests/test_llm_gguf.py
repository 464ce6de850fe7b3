"""GGUF exports for llama.cpp and Ollama, read back with the gguf package: the LoRA adapter as
llama.cpp's converter writes it (names, shapes, alpha, q/k row order), the base model with its
tokenizer, and the refusals."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import ConfigError, ModelError
from shared.llm.gguf_export import check_gguf_exportable, write_adapter_gguf, write_model_gguf

# Leaf module -> llama.cpp tensor, written out here (not taken from gguf's map) so a wrong mapping fails.
LLAMA_CPP_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
RANK, ALPHA = 4, 8


def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict:
    """name -> (ne as llama.cpp reports it, type name, data as numpy in torch's [rows, cols] order)."""
    import gguf

    return {t.name: (t.shape.tolist(), t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def make_adapter(base: Path, folder: Path, **lora) -> Path:
    """A PEFT adapter on every linear layer with random A and B (not B = 0), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    from shared.llm.model import load_causal_lm

    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LLAMA_CPP_NAMES), init_lora_weights=False, **lora)
    get_peft_model(load_causal_lm(base), config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from shared.fixtures.tiny_llm import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("gguf_models")
    return {arch: build_tiny_causal_lm(root / arch, arch) for arch in ("llama", "mistral", "qwen2")}


def test_adapter_gguf_reads_back_as_llama_cpp_expects(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "facts")
    out = write_adapter_gguf(adapter, tiny_llama, tmp_path / "facts-lora.gguf")
    base_gguf = write_model_gguf(tiny_llama, tmp_path / "base-f16.gguf")

    fields = gguf_fields(out.path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == ALPHA and out.alpha == ALPHA
    assert not any(k.startswith(("llama.", "tokenizer.")) for k in fields)  # an adapter carries no hparams/vocab

    tensors = gguf_tensors(out.path)
    base = gguf_tensors(base_gguf)
    expected = {f"blk.{i}.{name}.weight.lora_{ab}" for i in range(2) for name in LLAMA_CPP_NAMES.values() for ab in "ab"}
    assert set(tensors) == expected
    for name, (ne, dtype, _) in tensors.items():
        weight = name.rsplit(".", 1)[0]
        base_ne = base[weight][0]  # [in, out]
        assert dtype == "F32"
        # llama.cpp's checks: lora_a ne = [in, r], lora_b ne = [r, out], matching the base tensor
        assert ne == ([base_ne[0], RANK] if name.endswith("lora_a") else [RANK, base_ne[1]]), name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_update_is_what_the_merged_model_gguf_holds(tiny_models, tmp_path, arch, rslora):
    """base GGUF + alpha/r * B @ A == the GGUF of the merged model, tensor by tensor: the adapter's q/k
    rows are reordered exactly as llama.cpp's converter reorders the weights (LLaMA, Mistral with
    grouped-query attention), Qwen2 untouched, and rsLoRA's scale folded into alpha."""
    from peft import PeftModel

    from shared.llm.model import load_causal_lm

    base = tiny_models[arch]
    adapter = make_adapter(base, tmp_path / "adapter", use_rslora=rslora)
    merged_dir = tmp_path / "merged"
    PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).merge_and_unload().save_pretrained(str(merged_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (merged_dir / name).write_bytes((base / name).read_bytes())

    out = write_adapter_gguf(adapter, base, tmp_path / "a.gguf")
    assert out.alpha == pytest.approx(ALPHA * math.sqrt(RANK) if rslora else ALPHA)
    lora = gguf_tensors(out.path)
    before = gguf_tensors(write_model_gguf(base, tmp_path / "base.gguf", outtype="f32"))
    after = gguf_tensors(write_model_gguf(merged_dir, tmp_path / "merged.gguf", outtype="f32"))
    assert gguf_fields(tmp_path / "a.gguf")["general.architecture"] == ("qwen2" if arch == "qwen2" else "llama")
    scale = out.alpha / RANK  # how llama.cpp scales an adapter
    checked = 0
    for name, (_, _, a) in lora.items():
        if not name.endswith(".lora_a"):
            continue
        weight = name[: -len(".lora_a")]
        b = lora[weight + ".lora_b"][2]
        np.testing.assert_allclose(before[weight][2] + scale * (b @ a), after[weight][2], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == 14
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in before  # Qwen2's q/k/v biases are exported


def test_base_model_gguf_carries_the_tokenizer_and_f16_weights(tiny_llama, llm_tokenizer, tmp_path):
    from shared.llm.data import BUILTIN_TEMPLATES

    path = write_model_gguf(tiny_llama, tmp_path / "base-f16.gguf", chat_template=BUILTIN_TEMPLATES["chatml"])
    fields = gguf_fields(path)
    config = json.loads((tiny_llama / "config.json").read_text())
    assert fields["general.type"] == "model" and fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.rope.freq_base"] == 10000.0 and fields["llama.vocab_size"] == config["vocab_size"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = {i: t for t, i in llm_tokenizer.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(vocab))]
    types = fields["tokenizer.ggml.token_type"]
    for special in ("<s>", "</s>", "<|user|>", "<|assistant|>"):
        assert types[llm_tokenizer.convert_tokens_to_ids(special)] == 3  # CONTROL: parsed in prompts
    assert types[llm_tokenizer.convert_tokens_to_ids("Z")] == 1  # NORMAL
    assert fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.bos_token_id"] == llm_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == llm_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds none; its template writes it
    assert fields["tokenizer.chat_template"] == BUILTIN_TEMPLATES["chatml"]  # the template trained with

    tensors = gguf_tensors(path)
    assert tensors["token_embd.weight"][:2] == ([64, config["vocab_size"]], "F16")
    assert tensors["blk.0.attn_q.weight"][1] == "F16" and tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert tensors["output_norm.weight"][:2] == ([64], "F32") and "output.weight" in tensors


def test_unsupported_architecture_is_one_line_and_writes_nothing(tiny_glm, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    for call in (lambda: write_adapter_gguf(adapter, tiny_glm, tmp_path / "x.gguf"),
                 lambda: write_model_gguf(tiny_glm, tmp_path / "y.gguf"),
                 lambda: check_gguf_exportable(tiny_glm)):
        with pytest.raises(ModelError, match=r"GGUF export supports LlamaForCausalLM, MistralForCausalLM, "
                                             r"Qwen2ForCausalLM; this model is TinyGLMForCausalLM") as err:
            call()
        assert "\n" not in str(err.value) and "convert_lora_to_gguf.py" in str(err.value)
    assert not list(tmp_path.glob("*.gguf"))


def test_dora_and_other_non_lora_weights_are_refused(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="use_dora: llama.cpp LoRA adapters have no DoRA magnitude vectors"):
        check_gguf_exportable(tiny_llama, use_dora=True)
    dora = make_adapter(tiny_llama, tmp_path / "dora", use_dora=True)
    with pytest.raises(ModelError, match="DoRA adapters cannot be exported to GGUF"):
        write_adapter_gguf(dora, tiny_llama, tmp_path / "dora.gguf")
    saved = make_adapter(tiny_llama, tmp_path / "heads", modules_to_save=["lm_head"])
    with pytest.raises(ModelError, match=r"modules_to_save=\['lm_head'\]: fully trained modules cannot go into"):
        write_adapter_gguf(saved, tiny_llama, tmp_path / "heads.gguf")


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "spm-like"
    shutil.copytree(tiny_llama, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"only byte-level BPE tokenizers .* with byte fallback \(SentencePiece style\)"):
        write_model_gguf(folder, tmp_path / "x.gguf")
