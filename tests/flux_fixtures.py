"""Tiny Flux.1 fixtures (issue 19): the same tiny model saved in every layout users have."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> dict[str, Path]:
    """Tiny FLUX.1-dev in every layout (see shared.fixtures.tiny_flux.build_tiny_flux)."""
    from shared.fixtures.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_dev"), "dev")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> dict[str, Path]:
    from shared.fixtures.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), "schnell", seed=1)


@pytest.fixture(scope="session")
def flux_model(tiny_flux):
    """The tiny dev model loaded from its BFL files, in float32 (CPU tests compare to 1e-4)."""
    import torch

    from shared.flux.base_model import load_flux_model

    return load_flux_model(tiny_flux["transformer"], ae=tiny_flux["ae"], clip_l=tiny_flux["clip_l"],
                           t5xxl=tiny_flux["t5xxl"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                           model_config=tiny_flux["model_config"], dtype=torch.float32)


@pytest.fixture
def flux_config(tmp_path, tiny_flux, image_dir):
    """A function returning a written YAML config for the tiny FLUX.1-dev (ComfyUI's all-in-one file; its T5
    tokenizer is found beside it), with overrides: short T5 prompts, no preview, caches under tmp_path."""
    from tests.conftest import write_config

    def make(**overrides) -> Path:
        values = dict(base_model=tiny_flux["comfy"], model_config=tiny_flux["model_config"], train_data_dir=image_dir,
                      output_dir=tmp_path / "out" / "my_flux", resolution=64, batch_size=2, max_train_steps=4,
                      save_steps=0, learning_rate=1e-3, seed=0, t5_max_length=16, preview=False,
                      cache_dir=tmp_path / "cache")
        values.update(overrides)
        return write_config(tmp_path / "flux.yaml", **values)

    return make
