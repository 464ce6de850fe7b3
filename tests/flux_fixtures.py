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
