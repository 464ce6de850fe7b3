"""Steps per second of the SD trainer on the tiny SD1.5 / SD2-v / SDXL models, with and without the
latent and text-encoder caches. Prints numbers; asserts nothing (speed is not a test).

    .venv/bin/python benchmarks/sd_tiny_steps.py [steps]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy


def main(steps: int = 30) -> None:
    from shared.config import config_from_dict
    from shared.fixtures.images import make_image_folder
    from shared.fixtures.tiny_sd import build_tiny_sd
    from shared.reporting import Reporter
    from shared.train import run_training

    torch.set_num_threads(1)

    class Timer(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "progress" and data["step"] == 1:
                self.t0 = time.perf_counter()
            if kind == "progress":
                self.t1 = time.perf_counter()

    root = Path(tempfile.mkdtemp())
    images = make_image_folder(root / "images", count=8)
    for arch, v in (("sd1", False), ("sd2", True), ("sdxl", False)):
        paths = build_tiny_sd(root / arch, arch, v_prediction=v, dtype=torch.float16 if arch == "sd2" else None)
        for label, extra in (("uncached", {}), ("cached", {"cache_latents": "memory",
                                                           "cache_text_encoder_outputs": True})):
            cfg = config_from_dict(dict(
                base_model=str(paths["safetensors"]), model_config=str(paths["config"]), train_data_dir=str(images),
                output_dir=str(root / "out" / f"{arch}_{label}"), resolution=64, batch_size=2,
                max_train_steps=steps, save_steps=0, **extra))
            timer = Timer()
            run_training(cfg, timer)
            rate = (steps - 1) / (timer.t1 - timer.t0)
            print(f"{arch:5s} {label:9s} {rate:6.1f} steps/s (batch 2, 64 px, 1 thread)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
