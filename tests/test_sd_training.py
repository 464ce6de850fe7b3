"""End to end on the tiny SD1.5 model: train, export in kohya format, load in diffusers."""

import re

import pytest
import torch
from safetensors import safe_open

from shared.preflight import load_config
from shared.sd.base_model import load_sd_model
from shared.train import run_training

KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def fixed_batch(model, seed=123, n=4):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    ids = model.tokenizers[0](["a red circle on a white background, flat shapes style"] * n,
                              padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = model.text_encoders[0](ids)[0]
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return latents, cond, noise, t


def eval_loss(unet, model, batch):
    latents, cond, noise, t = batch
    with torch.no_grad():
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        return torch.nn.functional.mse_loss(unet(noisy, t, cond).sample, noise).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd):
    from shared.fixtures.images import make_image_folder
    from tests.conftest import write_config

    root = tmp_path_factory.mktemp("train")
    images = make_image_folder(root / "images", count=6)
    deploy = root / "Lora"
    deploy.mkdir()
    (deploy / "shapes.safetensors").write_bytes(b"someone else's LoRA")
    config = write_config(
        root / "c.yaml", base_model=tiny_sd["safetensors"], model_config=tiny_sd["config"],
        train_data_dir=images, output_dir=root / "out" / "shapes", resolution=64, batch_size=2,
        max_train_steps=40, save_steps=15, learning_rate=2e-3, seed=0, lora_dropout=0.0,
        deploy_dir=deploy,
    )
    cfg = load_config(config)
    return cfg, run_training(cfg), root


def test_checkpoints_on_schedule_and_outputs(trained):
    cfg, result, root = trained
    assert result.steps == 40 and len(result.losses) == 40
    names = sorted(p.name for p in (root / "out" / "shapes" / "checkpoints").iterdir())
    assert names == ["shapes-step000015.safetensors", "shapes-step000030.safetensors",
                     "state-step000015", "state-step000030"]
    assert result.output_path == root / "out" / "shapes" / "shapes.safetensors"
    # the deploy folder already had a shapes.safetensors: it is untouched, ours is shapes_2
    assert (root / "Lora" / "shapes.safetensors").read_bytes() == b"someone else's LoRA"
    assert result.deployed_path == root / "Lora" / "shapes_2.safetensors"
    assert not [p for p in (root / "Lora").iterdir() if p.name.startswith(".")]  # no temp files left
    assert (root / "out" / "shapes" / "logs").is_dir()
    assert any((root / "out" / "shapes" / "logs").glob("events.out.tfevents.*"))


def test_kohya_keys_shapes_and_metadata(trained):
    cfg, result, root = trained
    with safe_open(str(result.deployed_path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert all(KOHYA_KEY.match(k) for k in keys), sorted(keys)[:5]
    modules = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(modules) == 72  # 6 Transformer2D blocks x 12 kohya targets in the tiny model
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_1_attentions_2_proj_out" in modules
    conv_down = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert conv_down.shape == (8, 32, 1, 1)  # SD1.x proj_in is a 1x1 conv
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (8, 32)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 16.0
    assert meta["ss_output_name"] == "shapes_2"  # the alias matches the file it ended up in
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "16.0")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    with safe_open(str(result.output_path), "pt") as f:
        assert f.metadata()["ss_output_name"] == "shapes"


def test_loads_in_diffusers_with_no_leftover_keys_and_the_implied_scale(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    cfg, result, _ = trained
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(result.output_path))  # raises on leftovers
    assert len(state) == 72 * 2

    base = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
        scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    batch = fixed_batch(base)
    before = eval_loss(pipe.unet, base, batch)
    latents, cond, noise, t = batch
    with torch.no_grad():
        base_out = pipe.unet(latents, t, cond).sample

    # what the file says the weights should become: W + alpha/rank * up @ down
    reference = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"]).unet
    modules = dict(reference.named_modules())
    with safe_open(str(result.output_path), "pt") as f, torch.no_grad():
        for key in f.keys():
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            down = f.get_tensor(key).float()
            up = f.get_tensor(stem + ".lora_up.weight").float()
            scale = float(f.get_tensor(stem + ".alpha")) / down.shape[0]
            name = next(n for n in modules if "lora_unet_" + n.replace(".", "_") == stem)
            weight = modules[name].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += scale * delta
        ref_out = reference(latents, t, cond).sample

    pipe.load_lora_weights(str(result.output_path), adapter_name="shapes")
    with torch.no_grad():
        lora_out = pipe.unet(latents, t, cond).sample
    assert torch.allclose(lora_out, ref_out, atol=1e-4), (lora_out - ref_out).abs().max()
    assert (lora_out - base_out).abs().mean() > 1e-3  # the LoRA does something
    # the trained LoRA lowers the denoising loss on a fixed batch of this data's captions
    after = eval_loss(pipe.unet, base, batch)
    assert after < before


def test_training_loss_falls(trained):
    _, result, _ = trained
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first
