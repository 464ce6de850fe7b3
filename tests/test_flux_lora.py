"""Flux LoRA (issue 19): targets on the double/single blocks, LoRA trained on the fused BFL
projections, and a kohya-named file that ComfyUI's rule, our own host-style merge and diffusers'
FluxPipeline all load with zero unmatched keys."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from shared.fixtures.tiny_flux import build_tiny_flux_components
from shared.flux import conditioning as C
from shared.flux import flow_matching as FM
from shared.flux import layout
from shared.flux.export import (
    expected_modules,
    file_modules,
    flux_lora_metadata,
    flux_lora_tensors,
    save_flux_lora,
)
from shared.flux.lora import DEFAULT_PARTS, LORA_PARTS, clip_l_targets, inject_flux_lora, select_targets
from shared.images.lora import inject_lora

RANK, ALPHA = 4, 8.0


def _randomize_b(*modules, seed=0):
    """Give every LoRA B random values, as training would, so the LoRA changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    latents = torch.randn(1, 16, 8, 8, generator=g)
    text = C.FluxText(torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                      torch.randn(1, cfg.pooled_projection_dim, generator=g), torch.zeros(6, 3))
    return latents, torch.tensor([0.6]), text


def _predict(transformer):
    latents, sigmas, text = _inputs(transformer)
    with torch.no_grad():
        return FM.predict(transformer, latents, sigmas, text, guidance_scale=3.5)


@pytest.fixture
def lora_model():
    transformer, vae, clip, t5 = build_tiny_flux_components("dev")
    base = _predict(transformer)
    targets = select_targets(dict(transformer.config))
    inject_flux_lora(transformer, targets, rank=RANK, alpha=ALPHA)
    te_targets = clip_l_targets(clip)
    inject_lora(clip, te_targets, rank=RANK, alpha=ALPHA, dropout=0.0, init="default")
    _randomize_b(transformer, clip)
    return transformer, clip, targets, base, te_targets


def test_targets_are_chosen_by_bfl_module_and_block():
    config = build_tiny_flux_components("dev")[0].config
    default = select_targets(config)
    assert len(default) == 2 * 8 + 2 * 2  # attention + MLP of each double block; linear1/linear2 of each single
    assert not any("mod" in t.name for t in default)
    everything = select_targets(config, parts=LORA_PARTS)
    assert len(everything) == 2 * 10 + 2 * 3
    some = select_targets(config, parts=DEFAULT_PARTS, double_blocks="1", single_blocks="none")
    assert {t.name.split(".")[1] for t in some} == {"1"} and all(t.name.startswith("double_blocks") for t in some)
    assert [t.name for t in select_targets(config, parts=["single"], single_blocks=[0])] == [
        "single_blocks.0.linear1", "single_blocks.0.linear2"]
    with pytest.raises(ValueError, match="outside 0-1"):
        select_targets(config, double_blocks="0-2")
    with pytest.raises(ValueError, match="not one of"):
        select_targets(config, parts=["img_attention"])
    with pytest.raises(ValueError, match="no Flux modules"):
        select_targets(config, double_blocks="none", single_blocks="none")


def test_fused_parts_share_one_lora_a_in_fp32():
    transformer = build_tiny_flux_components("dev")[0]
    base = _predict(transformer)
    targets = select_targets(transformer.config)
    params = inject_flux_lora(transformer, targets, rank=RANK, alpha=ALPHA)
    attn = transformer.transformer_blocks[0].attn
    assert attn.to_q.lora_A["default"] is attn.to_k.lora_A["default"] is attn.to_v.lora_A["default"]
    assert attn.add_q_proj.lora_A["default"] is not attn.to_q.lora_A["default"]
    single = transformer.single_transformer_blocks[0]
    assert single.attn.to_q.lora_A["default"] is single.proj_mlp.lora_A["default"]
    assert len(params) == len({id(p) for p in params}) == 2 * len(targets) + sum(len(t.parts) - 1 for t in targets)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)
    assert torch.allclose(_predict(transformer), base)  # B starts at zero


def test_file_keys_are_exactly_the_module_set_with_fused_shapes(lora_model, tmp_path):
    transformer, clip, targets, _, te_targets = lora_model
    tensors = flux_lora_tensors(transformer, clip)
    want = expected_modules(targets, te_targets)
    assert len(te_targets) == 2 * 6
    assert file_modules(tensors) == want
    assert set(tensors) == {f"{m}.{s}" for m in want for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in want and "lora_unet_single_blocks_1_linear1" in want
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in want
    inner = 64
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (RANK, inner)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * inner, RANK)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * inner + 4 * inner, RANK)
    assert all(tensors[f"{m}.alpha"].item() == ALPHA for m in want)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    meta = flux_lora_metadata(variant="dev", output_name="x", rank=RANK, alpha=ALPHA, base_model=tmp_path / "f.st",
                              resolution=512, training={})
    path = save_flux_lora(tmp_path / "x.safetensors", transformer, clip, meta)
    assert set(load_file(str(path))) == set(tensors)


def comfy_key_map(bfl_state: dict, clip_layers: int) -> dict[str, str]:
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip), restated: for a
    Flux model every `diffusion_model.<BFL key>.weight` is the target of `lora_unet_<BFL key with dots
    as underscores>`; CLIP-L layer b's `<c>.weight` of `clip_l.transformer.text_model.encoder.layers`
    is the target of `lora_te1_text_model_encoder_layers_<b>_<c with dots as underscores>` for c in
    self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2."""
    out = {}
    for key in bfl_state:
        if key.endswith(".weight"):
            out["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = "diffusion_model." + key
    for b in range(clip_layers):
        for c in ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"):
            out[f"lora_te1_text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = (
                f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight")
    return out


def test_comfyui_maps_every_key_and_the_merged_weights_reproduce_the_lora(lora_model):
    transformer, clip, targets, base, _ = lora_model
    tensors = {k: v.float() for k, v in flux_lora_tensors(transformer, clip).items()}
    fresh = build_tiny_flux_components("dev")[0]  # the same seed: the base weights
    bfl = layout.diffusers_to_bfl(fresh.state_dict(), dict(fresh.config))
    key_map = comfy_key_map(bfl, clip.config.num_hidden_layers)
    unmatched = [m for m in file_modules(tensors) if m not in key_map]
    assert unmatched == []
    # apply the file the way the hosts do: W += alpha / rank * up @ down on the BFL weight
    for module in file_modules(tensors):
        target = key_map[module]
        if not target.startswith("diffusion_model."):
            continue
        name = target[len("diffusion_model."):]
        up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
        delta = tensors[f"{module}.alpha"] / down.shape[0] * (up @ down)
        assert delta.shape == bfl[name].shape
        bfl[name] = bfl[name] + delta
    merged, leftover = layout.bfl_to_diffusers(bfl, dict(fresh.config))
    assert leftover == []
    fresh.load_state_dict(merged)
    want, got = _predict(transformer), _predict(fresh)
    assert not torch.allclose(want, base, atol=1e-3)
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()


def test_metadata_names_the_flux_base(tmp_path):
    from shared.flux.export import FLUX_IMPLEMENTATION

    for variant in ("dev", "schnell"):
        meta = flux_lora_metadata(variant=variant, output_name="my_flux", rank=16, alpha=16, resolution=1024,
                                  base_model=tmp_path / f"flux1-{variant}.safetensors", training={})
        assert meta["ss_base_model_version"] == "flux1" and meta["ss_v2"] == "False"
        assert meta["modelspec.architecture"] == f"flux-1-{variant}/lora"
        assert meta["ss_network_module"] == "networks.lora_flux"
        # Forge's rule (sd_forge_lora network.py detect_version): the BFL implementation URL, or the
        # dev architecture, lists the LoRA under Flux
        assert meta["modelspec.implementation"] == FLUX_IMPLEMENTATION
        assert all(isinstance(v, str) for v in meta.values())


def _diffusers_pipeline(transformer, clip, t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from shared.fixtures.tiny_flux import build_t5_tokenizer
    from shared.images.clip_tokenizer import clip_tokenizer

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=build_t5_tokenizer(),
                        transformer=transformer)


def _load_in_diffusers(path, transformer, clip, t5, caplog):
    pipe = _diffusers_pipeline(transformer, clip, t5)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    # what diffusers/PEFT log for keys of a file that found no module, or modules left without weights
    signs = ("unexpected keys", "unsupported keys", "missing keys", "incompatible keys", "not loaded")
    noise = [r.getMessage() for r in caplog.records if any(s in r.getMessage().lower() for s in signs)]
    return pipe, noise


def test_diffusers_loads_the_file_with_zero_unmatched_keys_and_same_output(tmp_path, caplog):
    """diffusers 0.42's kohya-Flux reader splits single-block linear1 with the full model's fixed
    sizes (3072 x 3 + 12288), so at this width the file trains the double blocks (single_blocks:
    none); test_diffusers_loads_single_block_linear1_at_full_width covers linear1."""
    transformer, vae, clip, t5 = build_tiny_flux_components("dev")
    base = _predict(transformer)
    targets = select_targets(transformer.config, single_blocks="none")
    inject_flux_lora(transformer, targets, rank=RANK, alpha=ALPHA)
    inject_lora(clip, clip_l_targets(clip), rank=RANK, alpha=ALPHA, dropout=0.0, init="default")
    _randomize_b(transformer, clip)
    want = _predict(transformer)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        clip_want = clip(ids).pooler_output
    path = save_flux_lora(tmp_path / "tiny.safetensors", transformer, clip,
                          flux_lora_metadata(variant="dev", output_name="tiny", rank=RANK, alpha=ALPHA,
                                             base_model=tmp_path / "b.safetensors", resolution=64, training={}))
    fresh, _, fresh_clip, fresh_t5 = build_tiny_flux_components("dev")
    with torch.no_grad():
        clip_base = fresh_clip(ids).pooler_output
    pipe, noise = _load_in_diffusers(path, fresh, fresh_clip, fresh_t5, caplog)
    assert noise == []
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert lora_layers == {p for t in targets for p in t.parts}
    got = _predict(pipe.transformer)
    assert not torch.allclose(got, base, atol=1e-3)
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()
    with torch.no_grad():
        clip_got = pipe.text_encoder(ids).pooler_output
    assert not torch.allclose(clip_got, clip_base, atol=1e-4)
    assert torch.allclose(clip_got, clip_want, atol=2e-3)


@pytest.mark.slow
def test_diffusers_loads_single_block_linear1_at_full_width(tmp_path, caplog):
    """At the real width (3072: 24 heads of 128) one single block is enough to check linear1's
    fused q, k, v, MLP layout against diffusers' own split (about 180M weights, bf16)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=0, num_single_layers=1,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                  guidance_embeds=False, axes_dims_rope=(16, 56, 56))

    def build():
        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(config)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model.to(torch.bfloat16).requires_grad_(False)

    transformer = build()
    targets = select_targets(transformer.config, parts=["single"])
    assert [t.name for t in targets] == ["single_blocks.0.linear1", "single_blocks.0.linear2"]
    inject_flux_lora(transformer, targets, rank=2, alpha=2.0)
    _randomize_b(transformer)
    for p in transformer.parameters():
        p.data = p.data.to(torch.bfloat16)

    def run(model):
        latents, sigmas, text = _inputs(model)
        with torch.no_grad():
            return FM.predict(model, latents, sigmas, C.FluxText(text.prompt_embeds.bfloat16(), text.pooled.bfloat16(),
                                                                  text.text_ids)).float()

    want = run(transformer)
    path = save_flux_lora(tmp_path / "wide.safetensors", transformer, None, {})
    assert file_modules(load_file(str(path))) == {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    del transformer
    fresh = build()
    base = run(fresh)
    pipe, noise = _load_in_diffusers(path, fresh, None, None, caplog)
    assert noise == []
    got = run(pipe.transformer)
    assert not torch.allclose(got, base, atol=1e-2)
    assert torch.allclose(got, want, atol=3e-2, rtol=3e-2), (got - want).abs().max()
