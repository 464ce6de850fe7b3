"""Each optimizer, LoRA type and EMA on the tiny SD1.5 model: steps per second, the optimizer state's size
in a training state, the last reported learning rate, and the noise loss of the training images at fixed
noise and timesteps before and after training. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/sd_optimizers.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy

RUNS = {  # name -> config keys
    "adamw": dict(optimizer="adamw", learning_rate=2e-3),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0, optimizer_args={"d_coef": 2.0}),
    "adafactor": dict(optimizer="adafactor", learning_rate=2e-3),
    "adafactor relative": dict(optimizer="adafactor", optimizer_args={"relative_step": True}),
    "lion": dict(optimizer="lion", learning_rate=3e-4),
    "adamw_schedulefree": dict(optimizer="adamw_schedulefree", learning_rate=2e-3, lr_warmup_ratio=0.1),
    "adamw + ema": dict(optimizer="adamw", learning_rate=2e-3, use_ema=True, ema_decay=0.9),
    "loha (adamw)": dict(lora_type="loha", learning_rate=2e-3),
    "lokr (adamw)": dict(lora_type="lokr", learning_rate=2e-3, lycoris_factor=4),
}


def fixed_loss(paths, image_dir, lora_path=None) -> float:
    """The training images' noise loss at fixed noise and timesteps, on the base or on the base with the
    LoRA merged in the way the hosts apply it (any type: shared/sd/lora_tools/merge.py)."""
    from shared.images.dataset import load_pixels, scan_dataset, tokenize
    from shared.sd.base_model import load_sd_model
    from shared.sd.conditioning import encode_text
    from shared.sd.lora_tools.merge import merge_into_checkpoint

    checkpoint = paths["safetensors"]
    if lora_path is not None:
        checkpoint = merge_into_checkpoint(checkpoint, [(lora_path, 1.0)], out_dir=Path(lora_path).parent,
                                           model_config=paths["config"]).path
    model = load_sd_model(checkpoint, paths["config"])
    items = scan_dataset(image_dir, None, ".txt").items
    pixels = torch.stack([load_pixels(i.path, (64, 64), (64, 64), (0, 0), False) for i in items])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        ehs, _ = encode_text(model, tokenize(model.tokenizers, [i.caption for i in items]))
        losses = []
        for _ in range(3):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(50, 950, (len(items),), generator=g)
            noisy = model.noise_scheduler.add_noise(latents, noise, t)
            losses.append(torch.nn.functional.mse_loss(model.unet(noisy, t, ehs).sample, noise).item())
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    from shared.config import config_from_dict
    from shared.fixtures.images import make_image_folder
    from shared.fixtures.tiny_sd import build_tiny_sd15
    from shared.reporting import Reporter
    from shared.train import run_training
    from shared.training import state as states

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, a few runs")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    steps = 10 if args.quick else args.steps
    runs = {k: RUNS[k] for k in ("adamw", "prodigy", "adamw + ema")} if args.quick else RUNS
    torch.set_num_threads(1)

    class Timer(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "progress":
                if data["step"] == 1:
                    self.t0 = time.perf_counter()
                self.t1, self.lr = time.perf_counter(), data["lr"]

    root = Path(tempfile.mkdtemp())
    paths = build_tiny_sd15(root / "model")
    images = make_image_folder(root / "images", count=6)
    before = fixed_loss(paths, images)
    print(f"tiny SD1.5, 6 images, batch 2, {steps} steps; fixed-noise loss of the base model: {before:.4f}")
    print(f"{'run':<22} {'steps/s':>8} {'opt. state':>11} {'last lr':>10} {'loss after':>11} {'change':>8}")
    for name, keys in runs.items():
        out = root / "runs" / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "") / "bench"
        cfg = config_from_dict(dict(base_model=paths["safetensors"], model_config=paths["config"], train_data_dir=images,
                                    output_dir=out, resolution=64, batch_size=2, max_train_steps=steps,
                                    save_steps=steps - 1, lora_dropout=0.0, seed=0, preview=False, **keys))
        timer = Timer()
        result = run_training(cfg, timer)
        rate = (steps - 1) / (timer.t1 - timer.t0)
        state = out / "checkpoints" / states.state_name(steps - 1)
        size = (state / "optimizer.pt").stat().st_size
        after = fixed_loss(paths, images, result.output_path)
        print(f"{name:<22} {rate:>8.2f} {size / 1024:>9.0f} K {timer.lr:>10.3g} {after:>11.4f} "
              f"{(after - before) / before:>+8.1%}")


if __name__ == "__main__":
    main()
