"""Training options: LoCon, gaussian init std, min-SNR and noise offset, v-prediction loss, 8-bit AdamW
message, and what a finished run leaves for people to see (samples, grid, sidecars, hashes)."""

import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from shared.errors import ConfigError
from shared.images.lora import inject_lora, kohya_conv_targets, kohya_unet_targets, lora_modules
from shared.preflight import load_config
from shared.sd.base_model import load_sd_model
from shared.sd.loss import noise_loss
from shared.train import run_training


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_locon_conv_modules_export_and_load_in_diffusers(sd_config, model, request):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    paths = request.getfixturevalue(model)
    sdxl = model == "tiny_sdxl"
    result = run_training(load_config(sd_config(base_model=paths["safetensors"], model_config=paths["config"],
                                                max_train_steps=2, conv_rank=4, conv_alpha=2)))
    # SD1 keeps diffusers names; SDXL uses the LDM names (input_blocks.1.0 = down_blocks.0.resnets.0)
    conv_key = "lora_unet_input_blocks_1_0_in_layers_2" if sdxl else "lora_unet_down_blocks_0_resnets_0_conv1"
    emb_key = "lora_unet_input_blocks_1_0_emb_layers_1" if sdxl else "lora_unet_down_blocks_0_resnets_0_time_emb_proj"
    attn_key = "lora_unet_input_blocks_4_1_proj_in" if sdxl else "lora_unet_down_blocks_0_attentions_0_proj_in"
    with safe_open(str(result.output_path), "pt") as f:
        keys = set(f.keys())
        conv = f.get_tensor(conv_key + ".lora_down.weight")
        conv_up = f.get_tensor(conv_key + ".lora_up.weight")
        alpha = float(f.get_tensor(conv_key + ".alpha"))
        attn_alpha = float(f.get_tensor(attn_key + ".alpha"))
        meta = f.metadata()
    assert conv.shape == (4, 32, 3, 3) and conv_up.shape == (32, 4, 1, 1) and alpha == 2.0 and attn_alpha == 16.0
    assert emb_key + ".lora_down.weight" in keys
    assert json.loads(meta["ss_network_args"])["conv_dim"] == 4

    base = load_sd_model(paths["safetensors"], paths["config"])
    expected = set(kohya_unet_targets(base.unet)) | set(kohya_conv_targets(base.unet))
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet,
            scheduler=base.noise_scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
            scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.load_lora_weights(str(result.output_path), adapter_name="locon")
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "locon" in m.lora_A}
    assert loaded == expected


def test_gaussian_init_uses_the_configured_std(tiny_sd):
    model = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    inject_lora(model.unet, kohya_unet_targets(model.unet), rank=8, alpha=8, dropout=0.0, init="gaussian",
                init_std=0.05)
    a = torch.cat([down.flatten() for _, down, _, _ in lora_modules(model.unet)])
    b = torch.cat([up.flatten() for _, _, up, _ in lora_modules(model.unet)])
    assert abs(a.std().item() - 0.05) < 0.005 and b.abs().max().item() == 0.0


def _loss_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    cond = torch.randn(4, 77, model.unet.config.cross_attention_dim, generator=g)
    return latents, cond


def test_min_snr_and_noise_offset_change_the_loss_as_defined(tiny_sd):
    model = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    latents, cond = _loss_inputs(model)

    def loss(**kw):
        with torch.no_grad():
            return noise_loss(model, latents, cond, torch.Generator().manual_seed(1), **kw).item()

    plain = loss()
    assert loss() == plain  # same generator seed, same loss
    # min-SNR weights are min(snr, gamma) / snr <= 1 for epsilon: the loss can only shrink
    assert loss(min_snr_gamma=1.0) < plain
    assert loss(min_snr_gamma=1e9) == pytest.approx(plain, rel=1e-6)
    assert loss(noise_offset=0.1) != plain


def test_v_prediction_loss_targets_velocity(tiny_sd2v):
    model = load_sd_model(tiny_sd2v["safetensors"], tiny_sd2v["config"])
    assert model.prediction_type == "v_prediction"
    latents, cond = _loss_inputs(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        got = noise_loss(model, latents, cond, g).item()
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        pred = model.unet(model.noise_scheduler.add_noise(latents, noise, t), t, cond).sample
        v = model.noise_scheduler.get_velocity(latents, noise, t)
    assert got == pytest.approx(torch.nn.functional.mse_loss(pred, v).item(), rel=1e-5)
    assert got != pytest.approx(torch.nn.functional.mse_loss(pred, noise).item(), rel=1e-3)


def test_adamw8bit_without_cuda_is_a_clear_error(sd_config):
    with pytest.raises(ConfigError, match="adamw8bit needs a CUDA GPU"):
        run_training(load_config(sd_config(optimizer="adamw8bit", device="cpu")))


def test_samples_grid_sidecars_and_hashes(sd_config, tmp_path):
    deploy = tmp_path / "Lora"
    cfg = load_config(sd_config(
        max_train_steps=4, sample_prompts=["a red circle", "a blue square"], sample_every_n_steps=2,
        sample_steps=2, trigger_word="shapesxyz", description="test shapes", deploy_dir=deploy,
    ))
    events = []

    class Rec:
        def log(self, message):
            pass

        def event(self, kind, **data):
            events.append((kind, data))

        def stop_requested(self):
            return False

    result = run_training(cfg, Rec())
    out = result.output_path.parent
    samples = sorted(p.name for p in (out / "logs" / "samples").glob("*.png"))
    assert samples == ["step000002-00.png", "step000002-01.png", "step000004-00.png", "step000004-01.png"]
    assert [d["step"] for k, d in events if k == "sample"] == [2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "logs")).Reload()
    assert {"sample/00", "sample/01"} <= set(board.Tags()["images"])
    assert [e.step for e in board.Images("sample/00")] == [2, 4]
    grid = Image.open(out / "my_lora-grid.png")
    assert grid.size == (4 * 64, 14 + 2 * 64)  # base, 0.5, 0.8, 1.0 x two prompts
    # the base column differs from the LoRA 1.0 column: the LoRA changes the image
    base = grid.crop((0, 14, 64, 78)).tobytes()
    full = grid.crop((192, 14, 256, 78)).tobytes()
    assert base != full
    for folder, stem in ((out, "my_lora"), (deploy, "my_lora")):
        assert Image.open(folder / f"{stem}.preview.png").size == (64, 64)
        sidecar = json.loads((folder / f"{stem}.json").read_text())
        assert sidecar["activation text"] == "shapesxyz" and sidecar["sd version"] == "SD1"
        assert sidecar["preferred weight"] == 0.8 and sidecar["description"] == "test shapes"
    with open(result.output_path, "rb") as fh:
        raw = fh.read()
    n = int.from_bytes(raw[:8], "little")
    with safe_open(str(result.output_path), "pt") as f:
        meta = f.metadata()
    # kohya's sshs_model_hash: sha256 of the bytes after the safetensors header
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.trigger_phrase"] == "shapesxyz"
    assert len(meta["ss_sd_model_hash"]) == 8


def _a1111_weight_decompose(updown, orig_weight, dora_scale):
    """AUTOMATIC1111's NetworkModule.apply_weight_decompose, restated from its documented formula:
    W' = (W + dW) * dora_scale / ||W + dW|| with the norm over the output axis per input column."""
    merged = updown + orig_weight
    dims = orig_weight.dim() - 1
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * dims).transpose(0, 1)
    return merged * (dora_scale / norm) - orig_weight


def test_dora_export_is_what_a1111_applies(sd_config, tiny_sd):
    from shared.images.dora import column_norm, decomposed_weight

    result = run_training(load_config(sd_config(max_train_steps=3, use_dora=True, learning_rate=1e-2)))
    base = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    targets = kohya_unet_targets(base.unet)
    inject_lora(base.unet, targets, rank=8, alpha=16, dropout=0.0, init="default", dora=True)
    modules = dict(base.unet.named_modules())
    checked = 0
    with safe_open(str(result.output_path), "pt") as f, torch.no_grad():
        keys = set(f.keys())
        assert sum(k.endswith(".dora_scale") for k in keys) == len(targets)
        for name in targets:
            key = "lora_unet_" + name.replace(".", "_")
            module = modules[name]
            down, up = f.get_tensor(key + ".lora_down.weight").float(), f.get_tensor(key + ".lora_up.weight").float()
            scale = f.get_tensor(key + ".dora_scale").float()
            weight = module.base_layer.weight
            assert scale.shape == (1, weight.shape[1], *weight.shape[2:]) if weight.dim() == 4 else (1, weight.shape[1])
            module.lora_A["default"].weight.copy_(down)
            module.lora_B["default"].weight.copy_(up)
            module.dora_scale.copy_(scale)
            updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * float(f.get_tensor(key + ".alpha")) / 8
            expected = weight + _a1111_weight_decompose(updown, weight, scale)
            assert torch.allclose(decomposed_weight(module), expected, atol=1e-5), name
            checked += 1
        # the magnitudes were trained, not left at their initial value
        name = targets[0]
        key = "lora_unet_" + name.replace(".", "_")
        assert not torch.allclose(f.get_tensor(key + ".dora_scale").float(), column_norm(modules[name].base_layer.weight),
                                  atol=1e-4)
    assert checked == 72
    x = torch.randn(2, 5, 32)
    to_k = modules["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert torch.allclose(to_k(x), torch.nn.functional.linear(x, decomposed_weight(to_k)), atol=1e-6)
