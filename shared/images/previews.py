"""What an image job (SD, Flux) shows people: images at a LoRA weight, the before/after grid and the
picture for the LoRA's card.

A family renders with its own pipeline; what they share is here: scaling every PEFT LoRA layer to a
weight for a render (0: the base model), the grid of every sample prompt at the weights in
`GRID_WEIGHTS` with labels on top, and writing PNGs whole (never a partial file).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from shared.files import atomic_write

GRID_WEIGHTS = (0.0, 0.5, 0.8, 1.0)


def latents_in(step_dtype, vae_dtype) -> dict:
    """A diffusers pipeline's `callback_on_step_end` arguments that keep its latents in the model's
    storage types: the schedulers step in fp32, so the next denoiser step gets `step_dtype` (bf16
    under mixed precision) and, after the last step, the VAE gets its own (fp32 for SDXL's)."""

    def cast(pipe, i, t, tensors):
        last = i == len(pipe.scheduler.timesteps) - 1
        return {"latents": tensors["latents"].to(vae_dtype if last else step_dtype)}

    return {"callback_on_step_end": cast, "callback_on_step_end_tensor_inputs": ["latents"]}


def _lora_layers(modules: Iterable):
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "lora_A") and hasattr(sub, "scale_layer") and "default" in sub.lora_A:
                yield sub


@contextlib.contextmanager
def lora_weight(modules: Iterable, weight: float):
    """Render with every LoRA layer in `modules` at `weight` (0: the base model), then restore the
    trained scale."""
    layers = list(_lora_layers(modules))
    for layer in layers:
        if hasattr(layer, "dora_strength"):  # DoRA blends the whole decomposed weight, as A1111 does
            layer.dora_strength = weight
        else:
            layer.scale_layer(weight)
    try:
        yield
    finally:
        for layer in layers:
            if hasattr(layer, "dora_strength"):
                layer.dora_strength = 1.0
            else:
                layer.unscale_layer()


def grid(rows: list[list], column_labels: list[str]):
    """A PIL grid: one row per prompt, one column per LoRA weight, labels on top."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    label_h = 14
    out = Image.new("RGB", (w * len(column_labels), label_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(column_labels):
        draw.text((c * w + 2, 1), label, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out.paste(img, (c * w, label_h + r * h))
    return out


def save_png(path: Path, image) -> Path:
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


def before_after_grid(render: Callable[[list[str], float], list], prompts: list[str], path: Path,
                      preferred_weight: float):
    """Write the grid of every prompt at each of `GRID_WEIGHTS` (0: the base) to `path`, rendered by
    `render(prompts, weight)`; return the first prompt's image at the weight nearest
    `preferred_weight` (the preview)."""
    columns = [render(prompts, w) for w in GRID_WEIGHTS]
    rows = [[col[i] for col in columns] for i in range(len(prompts))]
    save_png(path, grid(rows, ["base" if w == 0 else f"LoRA {w}" for w in GRID_WEIGHTS]))
    preferred = min(range(len(GRID_WEIGHTS)), key=lambda i: abs(GRID_WEIGHTS[i] - preferred_weight))
    return rows[0][preferred]
