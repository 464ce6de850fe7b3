"""A LoRA trained with default settings carries a `.preview.png` (the picture on its AUTOMATIC1111/Forge
card), rendered from a training caption when there are no sample prompts; `preview: false` turns it off."""

from __future__ import annotations

import numpy as np
from PIL import Image

from shared.preflight import load_config
from shared.train import run_training


def test_default_settings_write_a_preview_beside_the_lora_and_its_deployed_copy(sd_config, tmp_path):
    deploy = tmp_path / "Lora"
    result = run_training(load_config(sd_config(max_train_steps=2, deploy_dir=deploy)))
    previews = [result.output_path.with_name("my_lora.preview.png"), deploy / "my_lora.preview.png"]
    assert all(p.is_file() for p in previews)
    assert previews[0].read_bytes() == previews[1].read_bytes()
    image = np.asarray(Image.open(previews[0]).convert("RGB"), dtype=np.float32)
    assert image.shape == (64, 64, 3) and image.std() > 1.0  # a rendered picture, not a blank


def test_the_text_encoder_cache_renders_the_same_preview(sd_config, tmp_path):
    """With cached text conditioning the preview comes from the cache (no text encoder runs after
    caching) and shows what the uncached run shows."""
    common = dict(max_train_steps=2, lora_dropout=0.0)
    plain = run_training(load_config(sd_config(output_dir=tmp_path / "plain" / "p", **common)))
    cached = run_training(load_config(sd_config(output_dir=tmp_path / "cached" / "p",
                                                cache_text_encoder_outputs=True, **common)))
    a, b = (np.asarray(Image.open(r.output_path.with_name("p.preview.png")), dtype=np.int16) for r in (plain, cached))
    assert np.abs(a - b).max() <= 2


def test_preview_false_writes_none(sd_config, tmp_path):
    deploy = tmp_path / "Lora"
    result = run_training(load_config(sd_config(max_train_steps=2, deploy_dir=deploy, preview=False)))
    for folder in (result.output_path.parent, deploy):
        loras = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("report."))
        assert loras == ["my_lora.json", "my_lora.safetensors"]
