"""SD2 (v-prediction) and SDXL: real single files, exact loading, clear errors for what we do not train."""

import pytest
import torch

from shared.errors import ModelError
from shared.fixtures.tiny_sd import TINY, build_tiny_components, ldm_state_dict
from shared.sd.base_model import detect_architecture, load_sd_model, read_checkpoint


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_ldm_writer_round_trips_open_clip_and_unet_through_diffusers(arch):
    """Our OpenCLIP (fused qkv, transposed projection) and UNet names, read back by diffusers'
    own converters, give the same tensors under the same keys."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    unet, vae, encoders = build_tiny_components(arch, seed=5)
    ldm = ldm_state_dict(unet, vae, *encoders, arch=arch)
    prefix = "cond_stage_model.model." if arch == "sd2" else "conditioner.embedders.1.model."
    assert ldm[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape[0] == 3 * ldm[
        prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape[1]
    assert infer_diffusers_model_type(ldm) == ("v2" if arch == "sd2" else "xl_base")
    pairs = [
        (convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict()),
        (convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict()),
    ]
    open_clip = encoders[-1]
    converted = convert_open_clip_checkpoint(open_clip, ldm, prefix=prefix)
    if not hasattr(open_clip, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    pairs.append((converted, {k: v for k, v in open_clip.state_dict().items() if "position_ids" not in k}))
    if arch == "sdxl":
        assert ldm[prefix + "text_projection"].shape == (64, 32)  # [width, proj]: HF's transpose
        clip_l = {k: v for k, v in ldm.items() if k.startswith("conditioner.embedders.0.transformer.")}
        converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(clip_l).items()}
        pairs.append((converted, encoders[0].state_dict()))
    for got, expected in pairs:
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key].reshape(value.shape), value), key


def _assert_same_weights(loaded, original):
    a, b = loaded.state_dict(), original.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k  # fp16 storage for SD2


def test_sd2_v_single_file_loads_exactly_and_is_detected_as_v(tiny_sd2v):
    model = load_sd_model(tiny_sd2v["safetensors"], tiny_sd2v["config"])
    assert model.arch == "sd2" and model.prediction_type == "v_prediction" and model.metadata_arch == "sd2_v"
    assert model.tokenizers[0].pad_token == "!"
    unet, vae, encoders = build_tiny_components("sd2", 0)
    _assert_same_weights(model.vae, vae)
    _assert_same_weights(model.text_encoders[0], encoders[0])
    # the v mark changes one UNet bias; everything else is the original
    state = {k: v for k, v in model.unet.state_dict().items() if "norm1.bias" not in k}
    assert all(torch.allclose(state[k], unet.state_dict()[k].float(), atol=1e-3) for k in state)
    # the user can overrule detection
    assert load_sd_model(tiny_sd2v["safetensors"], tiny_sd2v["config"], "epsilon").metadata_arch == "sd2"


def test_sdxl_single_file_loads_exactly(tiny_sdxl):
    model = load_sd_model(tiny_sdxl["safetensors"], tiny_sdxl["config"])
    assert model.arch == "sdxl" and model.prediction_type == "epsilon"
    assert [t.pad_token for t in model.tokenizers] == ["<|endoftext|>", "!"]
    unet, vae, encoders = build_tiny_components("sdxl", 0)
    for loaded, original in ((model.unet, unet), (model.vae, vae), *zip(model.text_encoders, encoders)):
        _assert_same_weights(loaded, original)


def test_sdxl_diffusers_folder_loads(tmp_path):
    unet, vae, (te1, te2) = build_tiny_components("sdxl", 1)
    from shared.fixtures.tiny_sd import write_config_folder

    folder = write_config_folder(tmp_path / "xl", TINY["sdxl"], "sdxl")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    model = load_sd_model(folder)
    assert model.arch == "sdxl" and len(model.text_encoders) == 2
    _assert_same_weights(model.text_encoders[1], te2)


def test_shipped_full_size_configs_build():
    """The shipped configs are the real published sizes (checked on the meta device)."""
    import json
    from importlib import resources

    from diffusers import UNet2DConditionModel

    root = resources.files("shared.sd") / "model_configs"
    sizes = {}
    for name in ("sd2", "sd2_v", "sdxl"):
        config = json.loads((root / name / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        sizes[name] = sum(p.numel() for p in unet.parameters())
        sched = json.loads((root / name / "scheduler" / "scheduler_config.json").read_text())
        assert sched["prediction_type"] == ("v_prediction" if name == "sd2_v" else "epsilon")
    assert 865_000_000 < sizes["sd2"] < 866_000_000  # SD2.x UNet: 865.9M parameters
    assert 2_567_000_000 < sizes["sdxl"] < 2_568_000_000  # SDXL base UNet: 2.567B


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": 1,
          "model.diffusion_model.input_blocks.0.0.weight": 4}, "an SDXL refiner"),
        ({"model.diffusion_model.input_blocks.0.0.weight": 9,
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 1}, "inpainting"),
        ({"double_blocks.0.img_attn.qkv.weight": 1}, "Flux/SD3"),
        ({"model.diffusion_model.input_blocks.0.0.weight": 4}, "without a text encoder we know"),
    ],
)
def test_architectures_we_do_not_train_are_named(keys, message):
    state = {k: torch.zeros(2, c, 3, 3) if c != 1 else torch.zeros(2) for k, c in keys.items()}
    with pytest.raises(ModelError, match=message):
        detect_architecture(state, "model.safetensors")


def test_sd2_prediction_type_comes_from_the_weights(tiny_sd2v):
    from shared.sd.base_model import detect_prediction_type

    state = read_checkpoint(tiny_sd2v["safetensors"])
    assert detect_architecture(state, tiny_sd2v["safetensors"]) == "sd2"
    assert detect_prediction_type(state, "sd2") == "v_prediction"
    for key in [k for k in state if k.endswith("transformer_blocks.0.norm1.bias")]:
        state[key] = torch.zeros_like(state[key])  # what epsilon training leaves (spread below 0.09)
    assert detect_prediction_type(state, "sd2") == "epsilon"
    assert detect_prediction_type({**state, "v_pred": torch.zeros(0)}, "sd2") == "v_prediction"
    assert detect_prediction_type(state, "sd1") is None  # SD1 files give no sign: the config decides


def test_sd2_v_diffusers_folder_takes_prediction_type_from_its_scheduler(tmp_path):
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from shared.fixtures.tiny_sd import write_config_folder

    # an SD2-shaped folder: OpenCLIP-style (gelu) encoder as wide as the UNet's cross-attention
    configs = {**TINY["sd2"], "unet": {**TINY["sd2"]["unet"], "cross_attention_dim": 32},
               "text_encoder": {**TINY["sd2"]["text_encoder"], "hidden_size": 32, "num_attention_heads": 4}}
    folder = write_config_folder(tmp_path / "sd2v", configs, "sd2")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).save_pretrained(folder / "text_encoder")
    model = load_sd_model(folder)
    assert (model.arch, model.prediction_type, model.metadata_arch) == ("sd2", "v_prediction", "sd2_v")
    assert model.tokenizers[0].pad_token == "!"
