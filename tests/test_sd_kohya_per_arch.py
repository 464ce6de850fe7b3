"""Must show (issue 3): for SD1.5, SD2-v and SDXL tiny models saved as real single files, training
with UNet and text-encoder LoRA runs, the file loads in diffusers with zero unmatched keys, its key
set is kohya's target set for that architecture, and ss_base_model_version is right."""

import json

import pytest
import torch
from safetensors import safe_open

from shared.images.lora import kohya_text_encoder_targets, kohya_unet_targets
from shared.preflight import load_config
from shared.sd.base_model import load_sd_model
from shared.train import run_training

EXPECTED = {
    # arch: (ss_base_model_version, ss_v2, modelspec.architecture, text-encoder prefixes)
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", ["lora_te"]),
    "sd2": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", ["lora_te"]),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", ["lora_te1", "lora_te2"]),
}


def _modules(keys):
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}


def _pipeline(model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet,
            scheduler=model.noise_scheduler,
        )
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=model.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _wrapped(module, adapter):
    return {name for name, m in module.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def trained(request, tmp_path_factory):
    from shared.fixtures.images import make_image_folder
    from tests.conftest import write_config

    models = {"sd1": "tiny_sd", "sd2": "tiny_sd2v", "sdxl": "tiny_sdxl"}
    paths = request.getfixturevalue(models[request.param])
    tmp_path = tmp_path_factory.mktemp(request.param)
    images = make_image_folder(tmp_path / "images", count=4)
    config = write_config(
        tmp_path / "c.yaml", base_model=paths["safetensors"], model_config=paths["config"], train_data_dir=images,
        output_dir=tmp_path / "out" / f"lora_{request.param}", resolution=64, batch_size=2, max_train_steps=3,
        save_steps=0, learning_rate=1e-3, seed=0, train_text_encoder=True, text_encoder_lr=5e-4, lora_dropout=0.0,
        sample_prompts=["a red circle"], sample_steps=1,
    )
    cfg = load_config(config)
    return request.param, paths, run_training(cfg)


def test_trained_file_loads_in_diffusers_with_kohya_keys(trained):
    from diffusers import StableDiffusionPipeline

    arch, paths, result = trained
    version, v2, modelspec, te_prefixes = EXPECTED[arch]
    with safe_open(str(result.output_path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == (version, v2, modelspec)
    assert meta["ss_text_encoder_lr"] == "0.0005"

    base = load_sd_model(paths["safetensors"], paths["config"])
    modules = _modules(keys)
    # the text encoders: kohya names with text_model_ (what A1111/ComfyUI map), every CLIP attn/MLP Linear
    for prefix, encoder in zip(te_prefixes, base.text_encoders):
        expected = {f"{prefix}_text_model_" + n.removeprefix("text_model.").replace(".", "_")
                    for n in kohya_text_encoder_targets(encoder)}
        assert {m for m in modules if m.startswith(prefix + "_")} == expected
    assert not any(m.startswith("lora_te_") for m in modules) or te_prefixes == ["lora_te"]
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    if arch == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" in unet_modules  # LDM names
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2" in unet_modules
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_modules

    # diffusers converts every key (it raises on leftovers) ...
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(result.output_path), unet_config=base.unet.config)
    assert len(state) == len(keys) - len(modules)  # every down/up pair converted; alphas go to `alphas`

    pipe = _pipeline(base)
    unet_targets = set(kohya_unet_targets(base.unet))
    te_counts = [len(kohya_text_encoder_targets(encoder)) for encoder in base.text_encoders]
    pipe.load_lora_weights(str(result.output_path), adapter_name="mine")
    # ... and puts a LoRA on exactly kohya's targets of this UNet (in diffusers names)
    assert _wrapped(pipe.unet, "mine") == unet_targets  # zero unmatched, zero missing
    assert [len(_wrapped(encoder, "mine")) for encoder in base.text_encoders] == te_counts
    # the loaded weights are the file's: one UNet module checked against its tensors
    name = f"down_blocks.{1 if arch == 'sdxl' else 0}.attentions.0.transformer_blocks.0.attn2.to_k"
    module = dict(pipe.unet.named_modules())[name]
    kohya = "lora_unet_" + (name if arch != "sdxl" else "input_blocks.4.1.transformer_blocks.0.attn2.to_k").replace(".", "_")
    with safe_open(str(result.output_path), "pt") as f:
        assert torch.allclose(module.lora_A["mine"].weight, f.get_tensor(kohya + ".lora_down.weight").float())


def test_trained_metadata_dataset_fields(trained):
    arch, _, result = trained
    with safe_open(str(result.output_path), "pt") as f:
        meta = f.metadata()
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs == {"images": {"n_repeats": 1, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])["images"]
    assert tags["flat shapes style"] == 4
    buckets = json.loads(meta["ss_bucket_info"])
    assert buckets["buckets"]["0"] == {"resolution": [64, 64], "count": 4}
    assert float(meta["ss_training_started_at"]) > 1.7e9
    assert meta["ss_v_parameterization"] == str(arch == "sd2")


def test_preview_grid_and_sidecar_per_architecture(trained):
    arch, _, result = trained
    folder, stem = result.output_path.parent, result.output_path.stem
    assert (folder / f"{stem}.preview.png").is_file() and (folder / f"{stem}-grid.png").is_file()
    sidecar = json.loads((folder / f"{stem}.json").read_text())
    assert sidecar["sd version"] == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[arch]
