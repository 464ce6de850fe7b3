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
