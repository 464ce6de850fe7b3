"""Shared fixtures: tiny real-architecture models saved in real formats, and a network guard."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.llm_fixtures", "tests.flux_fixtures"]  # tiny causal LMs; tiny Flux (test_flux_*.py)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
    """Tests may talk to their own servers on loopback and nothing else: a hub call fails loudly."""
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect

# Tiny models on a 2-core machine: one thread each is faster than threads fighting (up to 8x here
# when another process was busy)
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.5-architecture model as `.safetensors` and `.ckpt` plus its config folder."""
    from shared.fixtures.tiny_sd import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd"), formats=("safetensors", "ckpt"))


@pytest.fixture
def image_dir(tmp_path) -> Path:
    from shared.fixtures.images import make_image_folder

    return make_image_folder(tmp_path / "images", count=6)


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    return path


@pytest.fixture
def sd_config(tmp_path, tiny_sd, image_dir):
    """A function returning a written YAML config for the tiny model, with overrides."""

    def make(**overrides) -> Path:
        values = dict(
            base_model=tiny_sd["safetensors"],
            model_config=tiny_sd["config"],
            train_data_dir=image_dir,
            output_dir=tmp_path / "out" / "my_lora",
            resolution=64,
            batch_size=2,
            max_train_steps=4,
            save_steps=0,
            learning_rate=1e-3,
            seed=0,
            # the evaluation renders a dozen pictures per job: the tests of evaluation turn it on
            evaluation=False,
        )
        values.update(overrides)
        return write_config(tmp_path / "config.yaml", **values)

    return make


# --- SD2 / SDXL fixtures (issue 3) ------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD2 v-prediction model as a real single file (~120 MB in fp16: its text encoder must
    be 1024 wide for the loaders to see an SD2 file). Built once per session, never committed."""
    from shared.fixtures.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd2v"), "sd2", v_prediction=True, dtype=torch.float16)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL model (two text encoders, size/crop conditioning) as a real single file."""
    from shared.fixtures.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")
