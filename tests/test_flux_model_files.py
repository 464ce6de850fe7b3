"""Flux.1 base models as users have them (issue 19): each on-disk layout loads offline, to the same
weights, with dev/schnell read from the file and every bad file refused with one clear error."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import ModelError
from shared.fixtures.tiny_flux import TINY_FLUX, build_tiny_flux_components, tiny_configs
from shared.flux import layout
from shared.flux.base_model import load_flux_model
from shared.flux.fp8 import Fp8Linear
from shared.flux.tokenizers import find_t5_tokenizer


def _separate(paths, **kw):
    return load_flux_model(paths["transformer"], ae=paths["ae"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"],
                           t5_tokenizer=paths["t5_tokenizer"], model_config=paths["model_config"],
                           dtype=torch.float32, **kw)


def _assert_same(module, reference, atol):
    got, want = module.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def originals():
    return build_tiny_flux_components("dev", seed=0)


@pytest.mark.parametrize("layout_name", ["bfl", "comfy", "diffusers"])
def test_every_layout_loads_the_same_weights(tiny_flux, originals, layout_name):
    if layout_name == "bfl":
        model = _separate(tiny_flux)
    elif layout_name == "comfy":
        model = load_flux_model(tiny_flux["comfy"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                                model_config=tiny_flux["model_config"], dtype=torch.float32)
    else:
        model = load_flux_model(tiny_flux["diffusers"], dtype=torch.float32)
    transformer, vae, clip, t5 = originals
    assert model.variant == "dev" and model.guidance_embeds
    # the files hold bf16 (transformer, all-in-one) and fp16 (text encoders): compare at that precision
    _assert_same(model.transformer, transformer, 0.0 if layout_name == "diffusers" else 2e-2)
    _assert_same(model.vae, vae, 2e-2)
    _assert_same(model.text_encoder, clip, 2e-2)
    _assert_same(model.text_encoder_2, t5, 2e-2)
    assert model.tokenizer_2("a photo of sks").input_ids[-1] == model.tokenizer_2.eos_token_id


def test_schnell_is_detected_from_the_file(tiny_flux_schnell):
    assert layout.GUIDANCE_MARKER not in load_file(str(tiny_flux_schnell["transformer"]))
    model = _separate(tiny_flux_schnell)
    assert model.variant == "schnell" and not model.guidance_embeds
    assert model.scheduler.config.shift == 1.0 and not model.scheduler.config.use_dynamic_shifting
    assert model.tokenizer_2.model_max_length == 256
    folder = load_flux_model(tiny_flux_schnell["diffusers"], dtype=torch.float32)
    assert folder.variant == "schnell"


def test_fp8_files_load_bit_for_bit_with_fp8_storage(tiny_flux):
    raw = load_file(str(tiny_flux["transformer_fp8"]))
    assert raw["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    model = load_flux_model(tiny_flux["transformer_fp8"], ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"],
                            t5xxl=tiny_flux["t5xxl_fp8"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                            model_config=tiny_flux["model_config"], fp8_base=True)
    to_q = model.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, Fp8Linear) and to_q.weight.dtype == torch.float8_e4m3fn
    inner = TINY_FLUX["transformer"]["num_attention_heads"] * TINY_FLUX["transformer"]["attention_head_dim"]
    qkv = raw["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(to_q.weight.view(torch.uint8), qkv[:inner].view(torch.uint8))
    # without fp8 storage the same file is upcast to the compute dtype, exactly
    plain = load_flux_model(tiny_flux["transformer_fp8"], ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"],
                            t5xxl=tiny_flux["t5xxl_fp8"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                            model_config=tiny_flux["model_config"], dtype=torch.float32)
    w = plain.transformer.transformer_blocks[0].attn.to_q.weight
    assert w.dtype == torch.float32 and torch.equal(w, qkv[:inner].float())
    assert plain.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32


def test_bfl_names_round_trip_with_fused_qkv_and_swapped_final_layer(originals):
    transformer = originals[0]
    config = dict(transformer.config)
    bfl = layout.diffusers_to_bfl(transformer.state_dict(), config)
    inner = 64
    assert bfl["double_blocks.1.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * inner + 4 * inner, inner)
    assert bfl["single_blocks.0.linear2.weight"].shape == (inner, inner + 4 * inner)
    norm_out = transformer.state_dict()["norm_out.linear.weight"]
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"][:inner], norm_out[inner:])  # shift first
    assert "guidance_in.in_layer.weight" in bfl and "vector_in.in_layer.weight" in bfl
    back, leftover = layout.bfl_to_diffusers(bfl, config)
    assert leftover == []
    assert set(back) == set(transformer.state_dict())
    assert all(torch.equal(back[k], v) for k, v in transformer.state_dict().items())


def test_sizes_come_from_the_files_own_shapes(tiny_flux, tmp_path):
    bfl = load_file(str(tiny_flux["transformer"]))
    inferred = layout.infer_config(bfl)
    want = tiny_configs("dev")["transformer"]
    assert {k: inferred[k] for k in want if k != "_class_name"} == {k: v for k, v in want.items() if k != "_class_name"}
    # a model_config without transformer/config.json: the transformer's sizes are read from the file
    config = tmp_path / "config"
    shutil.copytree(tiny_flux["model_config"], config)
    shutil.rmtree(config / "transformer")
    model = load_flux_model(tiny_flux["transformer"], ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"],
                            t5xxl=tiny_flux["t5xxl"], t5_tokenizer=tiny_flux["t5_tokenizer"], model_config=config)
    assert model.transformer.config.num_layers == 2 and model.transformer.inner_dim == 64


def test_shipped_configs_have_the_published_sizes():
    from shared.flux.base_model import shipped_config_dir

    for variant in ("dev", "schnell"):
        folder = shipped_config_dir(variant)
        import json

        tr = json.loads((folder / "transformer" / "config.json").read_text())
        assert (tr["num_layers"], tr["num_single_layers"], tr["num_attention_heads"] * tr["attention_head_dim"]) == (19, 38, 3072)
        assert tr["guidance_embeds"] == (variant == "dev")
        vae = json.loads((folder / "vae" / "config.json").read_text())
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"]) == (16, 0.3611, 0.1159, False)


def _rewrite(src, dst, change):
    state = load_file(str(src))
    change(state)
    save_file(state, str(dst))
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("single_blocks.1.linear2.weight"), "lacks single_blocks.1.linear2.weight"),
    (lambda s: s.update({"double_blocks.0.img_attn.qkv.weight": s["double_blocks.0.img_attn.qkv.weight"][:-1]}),
     "rows"),
    (lambda s: s.update({"double_blocks.0.img_mlp.0.weight": s["double_blocks.0.img_mlp.0.weight"][:, :-1].contiguous()}),
     "of another shape"),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), "weights its config does not"),
])
def test_a_damaged_transformer_is_one_clear_error(tiny_flux, tmp_path, damage, message):
    bad = _rewrite(tiny_flux["transformer"], tmp_path / "bad.safetensors", damage)
    with pytest.raises(ModelError) as err:
        load_flux_model(bad, ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"], t5xxl=tiny_flux["t5xxl"],
                        t5_tokenizer=tiny_flux["t5_tokenizer"], model_config=tiny_flux["model_config"])
    assert message in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_wrong_component_files_are_refused(tiny_flux, tmp_path):
    with pytest.raises(ModelError, match="ae: needed"):
        load_flux_model(tiny_flux["transformer"], clip_l=tiny_flux["clip_l"], t5xxl=tiny_flux["t5xxl"],
                        t5_tokenizer=tiny_flux["t5_tokenizer"], model_config=tiny_flux["model_config"])
    with pytest.raises(ModelError, match="CLIP-L text encoder does not match"):  # T5 given as CLIP-L
        load_flux_model(tiny_flux["transformer"], ae=tiny_flux["ae"], clip_l=tiny_flux["t5xxl"],
                        t5xxl=tiny_flux["t5xxl"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                        model_config=tiny_flux["model_config"])
    truncated = _rewrite(tiny_flux["ae"], tmp_path / "ae.safetensors", lambda s: s.pop("decoder.conv_out.weight"))
    with pytest.raises(ModelError, match="autoencoder does not match"):
        load_flux_model(tiny_flux["transformer"], ae=truncated, clip_l=tiny_flux["clip_l"], t5xxl=tiny_flux["t5xxl"],
                        t5_tokenizer=tiny_flux["t5_tokenizer"], model_config=tiny_flux["model_config"])
    with pytest.raises(ModelError, match="not a Flux transformer"):
        load_flux_model(tiny_flux["ae"], t5_tokenizer=tiny_flux["t5_tokenizer"])


def test_an_sd_checkpoint_is_not_taken_for_flux(tiny_sd):
    with pytest.raises(ModelError, match="not a Flux transformer"):
        load_flux_model(tiny_sd["safetensors"])


def test_t5_tokenizer_is_found_where_the_hosts_keep_it(tiny_flux, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    comfy = tmp_path / "ComfyUI"
    model = comfy / "models" / "diffusion_models" / "flux" / "flux1-dev.safetensors"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_flux["transformer"], model)
    with pytest.raises(ModelError, match="set t5_tokenizer to a folder"):
        find_t5_tokenizer([model])
    shutil.copytree(tiny_flux["t5_tokenizer"], comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    assert find_t5_tokenizer([model]) == comfy / "comfy" / "text_encoders" / "t5_tokenizer"
    forge = tmp_path / "forge"
    forge_model = forge / "models" / "Stable-diffusion" / "flux1-dev.safetensors"
    forge_model.parent.mkdir(parents=True)
    forge_model.write_bytes(b"")
    tok = forge / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev" / "tokenizer_2"
    shutil.copytree(tiny_flux["t5_tokenizer"], tok)
    assert find_t5_tokenizer([forge_model]) == tok
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--google--t5-v1_1-xxl" / "snapshots" / "abc"
    shutil.copytree(tiny_flux["t5_tokenizer"], hub)
    assert find_t5_tokenizer([tmp_path / "elsewhere" / "x.safetensors"]) == hub
    with pytest.raises(ModelError, match="not a tokenizer folder"):
        find_t5_tokenizer([model], explicit=tmp_path)
    # a model loads with its tokenizer found beside the host install, no key needed
    loaded = load_flux_model(model, ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"], t5xxl=tiny_flux["t5xxl"],
                             model_config=tiny_flux["model_config"])
    assert loaded.sources["t5_tokenizer"] == comfy / "comfy" / "text_encoders" / "t5_tokenizer"


def test_flux_files_are_told_from_sd_ones_by_their_names(tiny_flux, tiny_sd):
    from shared.flux.base_model import looks_like_flux

    for key in ("transformer", "transformer_fp8", "comfy", "diffusers"):
        assert looks_like_flux(tiny_flux[key]), key
    for path in (tiny_sd["safetensors"], tiny_sd["ckpt"], tiny_sd["config"], tiny_flux["ae"], tiny_flux["t5xxl"]):
        assert not looks_like_flux(path), path
