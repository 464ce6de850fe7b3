"""The bundled demo: train the tiny SD1.5-architecture model on the bundled shape images.

Everything is local: the model is built from a fixed seed and saved as a real single-file
checkpoint the first time, then reused.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

DEMO_IMAGES = resources.files("shared") / "demo" / "images"


def demo_config(workdir: Path) -> Path:
    """Write (or reuse) the demo model and return the path of a ready-to-run YAML config."""
    from shared.fixtures.tiny_sd import build_tiny_sd15

    workdir = Path(workdir).resolve()
    models = workdir / "models"
    checkpoint = models / "tiny-sd15.safetensors"
    if not checkpoint.is_file():
        print(f"Building the tiny demo model in {models} ...", flush=True)
        build_tiny_sd15(models)
    config = {
        "base_model": str(checkpoint),
        "model_config": str(models / "tiny-sd15-config"),
        "train_data_dir": str(DEMO_IMAGES),
        "output_dir": str(workdir / "output" / "demo_shapes"),
        "deploy_dir": str(workdir / "Lora"),
        "resolution": 64,
        "lora_rank": 8,
        "lora_alpha": 16,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "max_train_steps": 60,
        "save_steps": 20,
        "seed": 1,
    }
    path = workdir / "demo.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(workdir: Path) -> None:
    from shared.config import load_config
    from shared.train import run_training

    config_path = demo_config(workdir)
    print(f"Demo config: {config_path}", flush=True)
    result = run_training(load_config(config_path))
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"\nDemo finished: {result.steps} steps, loss {first:.4f} -> {last:.4f} (mean of the last 10)")
    print(f"LoRA: {result.output_path}")
    print(f"Deployed into the demo Lora folder: {result.deployed_path}")
