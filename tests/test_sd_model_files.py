"""Tokenizer, LDM single-file layout and offline checkpoint loading."""

import pickle
import zipfile

import pytest
import torch

from shared.errors import ModelError
from shared.fixtures.tiny_sd import TINY_SD15, build_tiny_sd15_components, ldm_state_dict
from shared.sd.base_model import load_sd_model, read_checkpoint


def test_tokenizer_matches_open_clip():
    import open_clip

    from shared.images.clip_tokenizer import clip_tokenizer

    ours = clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")
    for text in ["a photo of a cat, cyberpunk style!", "Héllo wörld ☃ 12345", "sks person, (masterpiece:1.2)"]:
        ids = ours(text).input_ids
        assert ids == reference([text])[0].tolist()[: len(ids)]
    assert len(ours) == 49408 and ours.model_max_length == 77


def test_ldm_writer_round_trips_through_diffusers_converters():
    """Our diffusers->LDM names, read back by diffusers' own LDM->diffusers converters, give the
    same tensors under the same keys: the single files we write are real SD files."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, te = build_tiny_sd15_components(3)
    ldm = ldm_state_dict(unet, vae, te)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in ldm
    for converted, original in (
        (convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict()),
        (convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict()),
    ):
        assert set(converted) == set(original)
        for key, value in original.items():
            assert torch.equal(converted[key].reshape(value.shape), value), key


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_loads_exactly(tiny_sd, fmt):
    model = load_sd_model(tiny_sd[fmt], tiny_sd["config"])
    unet, vae, te = build_tiny_sd15_components(0)
    assert model.arch == "sd1" and model.prediction_type == "epsilon"
    for loaded, original in ((model.unet, unet), (model.vae, vae), (model.text_encoders[0], te)):
        a, b = loaded.state_dict(), original.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_size_without_model_config_is_a_clear_error(tiny_sd):
    with pytest.raises(ModelError, match="does not match its config.*set model_config"):
        load_sd_model(tiny_sd["safetensors"])  # the shipped config is full-size SD1.5


def test_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="model.safetensors: not a readable checkpoint"):
        load_sd_model(bogus)


def test_checkpoint_of_something_else(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        load_sd_model(other)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/lora_daemon_pwned",))


def test_ckpt_with_pickle_payload_is_refused_without_running_it(tmp_path):
    import os

    marker = "/tmp/lora_daemon_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, str(evil))
    assert zipfile.is_zipfile(evil)
    with pytest.raises(ModelError, match="evil.ckpt: not a readable checkpoint"):
        read_checkpoint(evil)
    assert not os.path.exists(marker)
    assert pickle  # the payload is a real pickle reduce, kept importable for the test


def test_tiny_fixture_has_sd15_block_layout():
    assert TINY_SD15["unet"]["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert len(TINY_SD15["vae"]["block_out_channels"]) == 4
