"""The pre-flight (shared/preflight.py) in this process: the model family from a checkpoint's header, the
family's rules, the order of the checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from model_headers import header_only_checkpoint, llm_job, sd15_layout, sdxl_layout

from shared.errors import ConfigError, UserError
from shared.model_family import _from_configs, model_family, read_safetensors_header
from shared.preflight import PathNotAllowed, check
from shared.roots import Roots
from shared.sd.base_model import SD1_TEXT_KEY, UNET_KEY_PREFIX


def config(**values) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def test_the_family_and_its_resolution_multiple_come_from_the_header(tmp_path, tiny_sd):
    sd15 = model_family(sd15_layout(tmp_path / "sd15.safetensors"))
    assert (sd15.task, sd15.arch, sd15.resolution_multiple) == ("sd", "sd1", 64)
    sdxl = model_family(sdxl_layout(tmp_path / "sdxl.safetensors"))
    assert (sdxl.task, sdxl.arch, sdxl.resolution_multiple) == ("sd", "sdxl", 32)
    # the tiny test model: its header says what its config folder says (what the trainer loads)
    tiny = model_family(tiny_sd["safetensors"])
    assert tiny.arch == "sd1" and tiny.resolution_multiple == _from_configs(tiny_sd["config"]) == 16
    # a .ckpt is a pickle: not read here; the conservative rule, or its model_config's
    assert model_family(tiny_sd["ckpt"]).resolution_multiple == 64
    assert model_family(tiny_sd["ckpt"], tiny_sd["config"]).resolution_multiple == 16
    assert len(read_safetensors_header(tiny_sd["safetensors"])) > 100


def test_refused_families_and_files_are_named(tmp_path):
    flux = header_only_checkpoint(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": [9, 3]})
    with pytest.raises(UserError, match="a transformer .Flux/SD3-style. checkpoint"):
        model_family(flux)
    inpaint = header_only_checkpoint(tmp_path / "inpaint.safetensors",
                                     {UNET_KEY_PREFIX + "input_blocks.0.0.weight": [320, 9, 3, 3], SD1_TEXT_KEY: [1]})
    with pytest.raises(UserError, match=r"an inpainting/instruct UNet \(9 input channels\)"):
        model_family(inpaint)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.safetensors: not a readable checkpoint .no safetensors header."):
        model_family(text)
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text('{"model_type": "llama"}')
    assert model_family(llm).task == "llm"
    with pytest.raises(ConfigError, match=r"^task: sd, but base_model .*llm is a Transformers language model"):
        model_family(llm, task="sd")


def test_resolution_must_fit_the_models_own_downsampling(tmp_path, image_dir):
    base = sd15_layout(tmp_path / "sd15.safetensors")
    values = config(base_model=base, train_data_dir=image_dir, output_dir=tmp_path / "out" / "x")
    with pytest.raises(ConfigError) as err:
        check({**values, "resolution": 520}, source="job.yaml")
    assert str(err.value) == ("job.yaml: resolution 520 is not a multiple of 64, which this SD1.x model needs (its "
                              "VAE and UNet halve the image 6 times; its safetensors header); use 512 or 576")
    checked = check({**values, "resolution": 512}, source="job.yaml")
    assert checked.task == "sd" and checked.family.arch == "sd1" and checked.items == 6
    assert checked.canonical["task"] == "sd" and checked.config.task == "sd"  # resolved once, stored
    xl = sdxl_layout(tmp_path / "sdxl.safetensors")
    assert check({**values, "base_model": str(xl), "resolution": 544}, source="job.yaml").family.arch == "sdxl"


def test_a_key_that_does_not_apply_to_the_family_is_refused(tmp_path, sd_config):
    job = llm_job(tmp_path)
    assert check(job, source="llm.yaml").items == 2
    with pytest.raises(ConfigError) as err:
        check({**job, "resolution": 512}, source="llm.yaml")
    assert str(err.value).startswith(f"llm.yaml: resolution is an SD and Flux setting and does not apply here: base_model "
                                     f"{tmp_path / 'llm'} is a llama language model (its config.json); remove resolution")
    sd = yaml.safe_load(sd_config().read_text())
    with pytest.raises(ConfigError, match=r"max_seq_len is an LLM setting and does not apply here: .* SD1.x model"):
        check({**sd, "max_seq_len": 64}, source="sd.yaml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": 5}\n')
    with pytest.raises(UserError, match="bad.jsonl line 1: `completion` must be text"):  # the rows, before a job
        check({**job, "train_data_dir": str(bad)}, source="llm.yaml")


def test_paths_meet_their_roots_before_anything_looks_at_them(tmp_path, image_dir, tiny_sd):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = outside / "secret.csv"
    secret.write_text("SECRET-FIRST-LINE\n")
    roots = Roots(read=[image_dir, tiny_sd["safetensors"].parent, tiny_sd["config"]], write=[allowed])
    job = config(base_model=tiny_sd["safetensors"], model_config=tiny_sd["config"], train_data_dir=image_dir,
                 output_dir=allowed / "x", resolution=64)
    assert check(job, source="c", roots=roots).task == "sd"
    cases = {
        "metadata_path": secret,  # today's first line of the refusal would be the file's
        "base_model": outside / "missing.safetensors",  # no answer on whether it exists
        "cache_dir": image_dir / "cache",  # written: a read root is not enough
        "log_dir": outside / "logs",
    }
    for key, value in cases.items():
        with pytest.raises(PathNotAllowed) as err:
            check({**job, key: str(value)}, source="c", roots=roots)
        assert err.value.key == key and str(err.value).startswith(f"{key}: ")
        assert "SECRET" not in str(err.value) and "does not exist" not in str(err.value)
    with pytest.raises(PathNotAllowed, match="outside the folders this daemon may write"):
        check({**job, "cache_dir": str(image_dir / "cache")}, source="c", roots=roots)
