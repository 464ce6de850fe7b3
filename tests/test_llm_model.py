"""Loading causal LMs offline, choosing LoRA targets, gradient checkpointing, QLoRA's refusal."""

import json

import pytest
import torch

from shared.errors import ConfigError, ModelError
from shared.llm.lora import add_lora, default_targets, enable_gradient_checkpointing, resolve_targets
from shared.llm.model import load_causal_lm, load_tokenizer
from tests.llm_fixtures import llm_config

LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
GLM_LINEAR = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def leaves(names):
    return {n.rsplit(".", 1)[-1] for n in names}


def test_default_targets_are_all_linear_layers_but_the_head(tiny_llama, tiny_glm):
    llama = load_causal_lm(tiny_llama)
    targets = default_targets(llama)
    assert leaves(targets) == LLAMA_LINEAR and len(targets) == 14
    assert "lm_head" not in targets
    glm = load_causal_lm(tiny_glm, trust_remote_code=True)
    targets = default_targets(glm)
    assert leaves(targets) == GLM_LINEAR and len(targets) == 8
    assert "transformer.encoder.layers.0.self_attention.query_key_value" in targets
    assert "transformer.output_layer" not in targets


def test_gpt2_style_conv1d_layers_are_targets(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    model = load_causal_lm(folder)
    targets = default_targets(model)
    assert leaves(targets) == {"c_attn", "c_proj", "c_fc"} and len(targets) == 8  # c_proj: attention and MLP
    peft_model = add_lora(model, llm_config(folder, tmp_path, tmp_path / "out"), targets)
    assert peft_model.peft_config["default"].fan_in_fan_out
    peft_model(input_ids=torch.arange(10).view(1, 10)).logits.sum().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert len(grads) == 8 and all(g is not None for g in grads)


def test_peft_wraps_exactly_the_chosen_modules(tiny_glm, tmp_path):
    model = load_causal_lm(tiny_glm, trust_remote_code=True)
    cfg = llm_config(tiny_glm, tmp_path, tmp_path / "out", use_rslora=True, use_dora=True)
    targets = resolve_targets(model, ["query_key_value", "dense_4h_to_h"])
    peft_model = add_lora(model, cfg, targets)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(targets) and len(wrapped) == 4
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    config = peft_model.peft_config["default"]
    assert config.use_rslora and config.use_dora and set(config.target_modules) == {"query_key_value", "dense_4h_to_h"}


def test_full_module_paths_and_suffixes_are_accepted(tiny_llama):
    model = load_causal_lm(tiny_llama)
    assert resolve_targets(model, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert len(resolve_targets(model, ["self_attn.q_proj", "mlp.down_proj"])) == 4


def test_target_module_that_does_not_exist_is_one_clear_error(tiny_llama):
    model = load_causal_lm(tiny_llama)
    with pytest.raises(ConfigError, match=r"target_modules: no module named 'q_prj' in this model \(did you mean 'q_proj'\?\); linear layers here: down_proj, gate_proj"):
        resolve_targets(model, ["q_proj", "q_prj"])
    with pytest.raises(ConfigError, match="target_modules: 'self_attn' is not a linear layer"):
        resolve_targets(model, ["self_attn"])


def test_folder_that_is_not_a_causal_lm_is_one_clear_error(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, CLIPTextConfig, CLIPTextModel

    bert = tmp_path / "bert"
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertForMaskedLM(BertConfig(**tiny)).save_pretrained(bert)
    with pytest.raises(ModelError, match=r"bert model \(BertForMaskedLM\), which has no causal language-model head"):
        load_causal_lm(bert)
    clip = tmp_path / "clip"
    CLIPTextModel(CLIPTextConfig(**tiny, max_position_embeddings=16)).save_pretrained(clip)
    with pytest.raises(ModelError, match="holds a clip_text_model model .*, not a causal language model"):
        load_causal_lm(clip)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json; it is not a Transformers model folder"):
        load_causal_lm(empty)


def test_remote_code_needs_the_opt_in(tiny_glm):
    with pytest.raises(ModelError, match="ships its own model code .* set `trust_remote_code: true`"):
        load_causal_lm(tiny_glm)
    assert type(load_causal_lm(tiny_glm, trust_remote_code=True)).__name__ == "TinyGLMForCausalLM"


def test_incomplete_checkpoint_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lacks 1 weights of its causal-LM class \(lm_head.weight"):
        load_causal_lm(broken)


def test_tokenizer_without_pad_uses_eos(tiny_llama, tmp_path):
    folder = tmp_path / "nopad"
    folder.mkdir()
    for f in tiny_llama.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder, trust_remote_code=False)
    assert tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("which", ["llama", "glm"])
def test_gradient_checkpointing_keeps_gradients_flowing_into_lora(tiny_llama, tiny_glm, tmp_path, which):
    folder = tiny_llama if which == "llama" else tiny_glm
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(folder, trust_remote_code=True)
        cfg = llm_config(folder, tmp_path, tmp_path / "out", lora_init="gaussian")
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model = add_lora(model, cfg, default_targets(model))
        with torch.no_grad():  # non-zero B so that A gets gradients too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        ids = torch.arange(1, 17).view(2, 8)
        out = model(input_ids=ids)
        out.logits.float().pow(2).mean().backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)


def test_4bit_without_cuda_is_a_clear_error(tiny_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    from shared.train import run_training

    cfg = llm_config(tiny_llama, tmp_path, tmp_path / "out", load_in_4bit=True)
    with pytest.raises(ConfigError, match="load_in_4bit: 4-bit QLoRA needs a CUDA GPU"):
        run_training(cfg)
    assert not (tmp_path / "out").exists()
