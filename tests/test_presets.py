"""Shipped presets (issue 20): listed with name, family and description; every key is a config key with a
valid value; the user's own keys win over the preset's."""

import pytest

from shared.config import FIELDS, config_from_dict
from shared.errors import ConfigError
from shared.presets import apply_preset, get_preset, list_presets

EXPECTED = {"sd15-character-8gb", "sd15-style-8gb", "sdxl-character-12gb", "sdxl-style-12gb", "sdxl-character-24gb",
            "flux-dev-style-24gb", "flux-dev-character-24gb"}


def test_presets_are_listed_with_what_they_are_for():
    presets = list_presets()
    assert {p.name for p in presets} == EXPECTED
    for p in presets:
        assert p.family in ("sd1", "sdxl", "flux") and p.card.endswith("GB") and len(p.description) > 60
    assert {p.name for p in list_presets("sdxl")} == {"sdxl-character-12gb", "sdxl-style-12gb", "sdxl-character-24gb"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_key_is_a_config_key_with_a_valid_value(name, tmp_path, tiny_sd, image_dir):
    preset = get_preset(name)
    unknown = set(preset.values) - set(FIELDS)
    assert not unknown
    required = {"base_model": str(tiny_sd["safetensors"]), "train_data_dir": str(image_dir),
                "output_dir": str(tmp_path / "out")}
    cfg = config_from_dict(apply_preset({"preset": name, **required}), source=name)
    for key, value in preset.values.items():
        assert getattr(cfg, key) == value, key


def test_user_keys_win_and_unknown_presets_are_named():
    merged = apply_preset({"preset": "sdxl-character-12gb", "lora_rank": 64, "learning_rate": 5e-5})
    assert merged["lora_rank"] == 64 and merged["learning_rate"] == 5e-5 and merged["resolution"] == 1024
    assert merged["preset"] == "sdxl-character-12gb"  # kept: the job's config names what was applied
    assert apply_preset({"lora_rank": 4}) == {"lora_rank": 4}
    assert apply_preset({"preset": "none", "lora_rank": 4}) == apply_preset({"preset": None, "lora_rank": 4}) == {
        "lora_rank": 4}
    with pytest.raises(ConfigError, match="unknown preset 'sdxl-anime' \\(shipped: flux-dev-character-24gb"):
        apply_preset({"preset": "sdxl-anime"})


def test_the_hosts_list_them_without_yaml_and_read_the_same_family():
    """The schema (the thin client the tab and the node load) lists the preset files and reads their family
    line with the standard library; it agrees with PyYAML."""
    from shared.schema import TRAIN
    from shared.schema.presets import NONE, preset_family, preset_names

    assert TRAIN["preset"].choices == (NONE, *sorted(EXPECTED)) and TRAIN["preset"].form.level == "basic"
    assert all(preset_family(p.name) == p.family for p in list_presets())
    assert preset_names() == tuple(sorted(EXPECTED))


def test_a_preset_in_a_config_file_and_what_its_keys_are_named_as(sd_config, tiny_sdxl, tmp_path):
    from shared.preflight import load_config

    cfg = load_config(sd_config(preset="sd15-character-8gb", learning_rate=3e-4))
    preset = get_preset("sd15-character-8gb").values
    assert (cfg.preset, cfg.lora_rank, cfg.text_encoder_lr, cfg.learning_rate) == (
        "sd15-character-8gb", preset["lora_rank"], preset["text_encoder_lr"], 3e-4)
    with pytest.raises(ConfigError, match=r"preset flux-dev-style-24gb is for Flux models, but base_model is an "
                                          r"SD1.x model .*; use one of sd15-character-8gb, sd15-style-8gb$"):
        load_config(sd_config(preset="flux-dev-style-24gb"))
    # a clash between a preset's key and the user's names the preset as where its key came from
    path = sd_config(base_model=tiny_sdxl["safetensors"], model_config=tiny_sdxl["config"],
                     preset="sdxl-character-12gb", train_text_encoder=True, mixed_precision="no", cache_latents="no")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path} (preset sdxl-character-12gb): cache_text_encoder_outputs needs a "
                                     "frozen text encoder")


def test_form_defaults_give_way_to_a_chosen_preset():
    from shared.schema import TRAIN
    from shared.schema.presets import form_values

    fields = {"lora_rank": 8, "learning_rate": 2e-4, "resolution": 768, "preset": "sdxl-style-12gb"}
    assert form_values(fields, TRAIN) == {"resolution": 768, "preset": "sdxl-style-12gb"}  # 8, 2e-4: defaults
    assert form_values({**fields, "preset": "none"}, TRAIN) == {"lora_rank": 8, "learning_rate": 2e-4,
                                                                "resolution": 768}
    merged = apply_preset(form_values(fields, TRAIN))
    assert (merged["lora_rank"], merged["learning_rate"], merged["resolution"]) == (32, 1e-4, 768)
