"""The pre-flight for Flux jobs (issue 19): the family from the header (never a pickle), the keys that
apply to Flux and SD, the resolution multiple 16, the separate files a transformer-only file needs,
the separate files' headers, the block numbers, and the T5 tokenizer found and kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_headers import header_only_checkpoint, sd15_layout

from shared import schema
from shared.errors import ConfigError
from shared.model_family import model_family
from shared.preflight import PathNotAllowed, check
from shared.roots import Roots


def config(**values) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def flux_header(path: Path, double: int = 19, single: int = 38, dev: bool = True, prefix: str = "") -> Path:
    """A FLUX.1 file's names at the published size (only the header: what the pre-flight reads)."""
    shapes = {"img_in.weight": [3072, 64], "txt_in.weight": [3072, 4096], "final_layer.linear.weight": [64, 3072]}
    shapes |= {f"double_blocks.{i}.img_attn.qkv.weight": [9216, 3072] for i in range(double)}
    shapes |= {f"single_blocks.{i}.linear1.weight": [21504, 3072] for i in range(single)}
    if dev:
        shapes["guidance_in.in_layer.weight"] = [3072, 256]
    return header_only_checkpoint(path, {prefix + k: v for k, v in shapes.items()})


def test_the_flux_family_comes_from_the_header_in_every_layout(tmp_path, tiny_flux, tiny_flux_schnell):
    full = model_family(flux_header(tmp_path / "flux1-dev.safetensors"))
    assert (full.task, full.arch, full.resolution_multiple, full.layout, full.blocks) == (
        "flux", "flux1-dev", 16, "bfl", (19, 38))
    assert full.describe() == "a FLUX.1-dev model (its safetensors header)"
    comfy = model_family(flux_header(tmp_path / "aio.safetensors", dev=False, prefix="model.diffusion_model."))
    assert (comfy.arch, comfy.layout) == ("flux1-schnell", "comfy")
    for key, layout in (("transformer", "bfl"), ("transformer_fp8", "bfl"), ("comfy", "comfy"), ("diffusers", "diffusers")):
        family = model_family(tiny_flux[key])
        assert (family.task, family.arch, family.layout, family.blocks) == ("flux", "flux1-dev", layout, (2, 2)), key
    assert model_family(tiny_flux_schnell["diffusers"]).arch == "flux1-schnell"
    assert model_family(tiny_flux["transformer_fp8"]).fp8 and not model_family(tiny_flux["transformer"]).fp8
    with pytest.raises(ConfigError, match="is a Flux model"):
        model_family(tiny_flux["transformer"], task="sd")


def test_which_keys_apply_to_flux(tmp_path, tiny_flux, image_dir, tiny_sd):
    base = config(base_model=tiny_flux["comfy"], model_config=tiny_flux["model_config"], train_data_dir=image_dir,
                  output_dir=tmp_path / "out" / "x", resolution=64)
    checked = check(base, source="job.yaml")
    assert checked.task == "flux" and checked.canonical["task"] == "flux"
    # SD keys that apply to Flux too (images, buckets, captions, caches, samples, the card) are accepted
    check({**base, "trigger_word": "sks", "random_flip": True, "cache_latents": "disk", "sample_steps": 4,
           "preferred_weight": 1.0, "train_text_encoder": True, "optimizer": "adamw"}, source="job.yaml")
    # a Flux preset sets its keys on a Flux model (dev or schnell); an SD preset is refused with the ones that fit
    preset = check({**base, "preset": "flux-dev-style-24gb"}, source="job.yaml").canonical
    assert (preset["lora_rank"], preset["cache_latents"], preset["resolution"]) == (16, "disk", 64)  # the user's wins
    with pytest.raises(ConfigError, match=r"preset sd15-style-8gb is for SD1.x models, .*; use one of "
                                          r"flux-dev-character-24gb, flux-dev-style-24gb$"):
        check({**base, "preset": "sd15-style-8gb"}, source="job.yaml")
    for key, value in (("noise_offset", 0.05), ("conv_rank", 4), ("cache_text_encoder_outputs", True),
                       ("prediction_type", "epsilon"), ("use_dora", True), ("max_seq_len", 64)):
        with pytest.raises(ConfigError) as err:
            check({**base, key: value}, source="job.yaml")
        assert f"{key} is an SD" in str(err.value) or f"{key} is an LLM" in str(err.value), key
        assert "FLUX.1-dev model" in str(err.value) and f"remove {key}" in str(err.value)
    sd = config(base_model=tiny_sd["safetensors"], model_config=tiny_sd["config"], train_data_dir=image_dir,
                output_dir=tmp_path / "out" / "x", resolution=64)
    for key, value in (("fp8_base", "true"), ("flux_ae", tiny_flux["ae"]), ("guidance_scale", 3.5)):
        with pytest.raises(ConfigError, match=f"{key} is a Flux setting and does not apply here"):
            check({**sd, key: value}, source="job.yaml")
    assert {s.name for s in schema.for_task(schema.FLUX)} >= {"resolution", "metadata_path", "sample_prompts",
                                                              "cache_latents", "flux_ae", "blocks_to_swap"}
    # every basic setting the SD forms always send applies to Flux too
    assert all(schema.FLUX in s.tasks for s in schema.form_settings(schema.SD, schema.BASIC))


def test_a_transformer_file_without_its_separate_files_is_one_line_naming_the_key(tmp_path, tiny_flux, image_dir):
    base = config(base_model=tiny_flux["transformer"], model_config=tiny_flux["model_config"],
                  train_data_dir=image_dir, output_dir=tmp_path / "out" / "x", resolution=64)
    with pytest.raises(ConfigError) as err:
        check(base, source="job.yaml")
    message = str(err.value)
    assert message.startswith("job.yaml: flux_ae: needed: base_model ") and "\n" not in message
    assert "set flux_ae to ae.safetensors (ComfyUI: models/vae; Forge: models/VAE)" in message
    assert "(also missing: flux_clip_l, flux_t5xxl)" in message
    with pytest.raises(ConfigError, match="flux_t5xxl: needed.*t5xxl_fp16.safetensors.*models/text_encoders"):
        check({**base, "flux_ae": str(tiny_flux["ae"]), "flux_clip_l": str(tiny_flux["clip_l"])}, source="job.yaml")
    whole = {**base, "flux_ae": str(tiny_flux["ae"]), "flux_clip_l": str(tiny_flux["clip_l"]),
             "flux_t5xxl": str(tiny_flux["t5xxl"])}
    assert check(whole, source="job.yaml").canonical["t5_tokenizer"] == str(tiny_flux["t5_tokenizer"])
    # the wrong file for a part is named from its header
    for key, wrong, says in (("flux_clip_l", "t5xxl", "not a CLIP-L text encoder"),
                             ("flux_t5xxl", "clip_l", "not a T5 encoder"), ("flux_ae", "clip_l", "not the Flux autoencoder")):
        with pytest.raises(ConfigError, match=f"^job.yaml: {key}: .* is {says}"):
            check({**whole, key: str(tiny_flux[wrong])}, source="job.yaml")
    # a diffusers folder has its own parts
    with pytest.raises(ConfigError, match="flux_ae: base_model .* is a diffusers folder with its own vae/"):
        check({**base, "base_model": str(tiny_flux["diffusers"]), "flux_ae": str(tiny_flux["ae"])}, source="job.yaml")


def test_flux_rules_resolution_blocks_and_guidance(tmp_path, tiny_flux, tiny_flux_schnell, image_dir):
    base = config(base_model=tiny_flux["comfy"], model_config=tiny_flux["model_config"], train_data_dir=image_dir,
                  output_dir=tmp_path / "out" / "x", resolution=64)
    with pytest.raises(ConfigError, match="resolution 72 is not a multiple of 16, which a Flux model needs.*use 64 or 80"):
        check({**base, "resolution": 72}, source="job.yaml")
    with pytest.raises(ConfigError, match="flux_single_blocks: block 5 does not exist: this model has 2 single blocks"):
        check({**base, "flux_single_blocks": "0,4-5"}, source="job.yaml")
    with pytest.raises(ConfigError, match="flux_double_blocks: the range 1-0 runs backwards; write 0-1"):
        check({**base, "flux_double_blocks": "1-0"}, source="job.yaml")
    with pytest.raises(ConfigError, match=r"blocks_to_swap: 9 is more than the model's 4 blocks \(2 double \+ 2 single\)"):
        check({**base, "blocks_to_swap": 9}, source="job.yaml")
    with pytest.raises(ConfigError, match="flux_double_blocks '1;2' must be all, none, or block numbers"):
        check({**base, "flux_double_blocks": "1;2"}, source="job.yaml")
    with pytest.raises(ConfigError, match="flux_lora_parts: 'attn' is not one of img_attn"):
        check({**base, "flux_lora_parts": ["attn"]}, source="job.yaml")
    with pytest.raises(ConfigError, match="flux_text_cache: disk needs fixed captions; turn off shuffle_caption"):
        check({**base, "flux_text_cache": "disk", "shuffle_caption": True}, source="job.yaml")
    with pytest.raises(ConfigError, match="blocks_to_swap: block swap runs in a single process .num_processes is 2."):
        check({**base, "blocks_to_swap": 2, "num_processes": 2}, source="job.yaml")
    assert check({**base, "fp8_base": True}, source="job.yaml").config.fp8_base == "true"  # YAML's true
    schnell = {**base, "base_model": str(tiny_flux_schnell["comfy"]), "model_config": str(tiny_flux_schnell["model_config"])}
    with pytest.raises(ConfigError, match="guidance_scale: FLUX.1-schnell has no guidance embedding"):
        check({**schnell, "guidance_scale": 3.5}, source="job.yaml")


def test_the_t5_tokenizer_is_found_inside_the_roots_or_refused(tmp_path, tiny_flux, image_dir, monkeypatch):
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model = tmp_path / "ComfyUI" / "models" / "checkpoints" / "flux-aio.safetensors"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_flux["comfy"], model)
    base = config(base_model=model, model_config=tiny_flux["model_config"], train_data_dir=image_dir,
                  output_dir=tmp_path / "out" / "x", resolution=64)
    with pytest.raises(ConfigError, match="^job.yaml: T5 tokenizer not found: set t5_tokenizer to a folder"):
        check(base, source="job.yaml")
    shutil.copytree(tiny_flux["t5_tokenizer"], tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer")
    found = check(base, source="job.yaml").canonical["t5_tokenizer"]
    assert found == str(tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer")
    roots = Roots(read=[tmp_path / "ComfyUI" / "models", image_dir, Path(tiny_flux["model_config"])],
                  write=[tmp_path / "out"])
    with pytest.raises(PathNotAllowed) as err:  # found outside the daemon's read roots: not used
        check(base, source="job.yaml", roots=roots)
    assert err.value.key == "t5_tokenizer"


def test_an_sd_file_still_reads_as_sd(tmp_path):
    assert model_family(sd15_layout(tmp_path / "sd15.safetensors")).task == "sd"
