"""Images people can look at: samples during training and the before/after grid at the end.

Samples use the model being trained (LoRA layers in place), an Euler scheduler built from the
training scheduler's config (so v-prediction models sample right) and a fixed seed per prompt, so
the images of successive steps differ only by what was learned.
"""

from __future__ import annotations

import contextlib


def build_pipeline(model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    if model.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_layers(model):
    for module in [model.unet, *model.text_encoders]:
        for sub in module.modules():
            if hasattr(sub, "lora_A") and hasattr(sub, "scale_layer") and "default" in sub.lora_A:
                yield sub


@contextlib.contextmanager
def lora_weight(model, weight: float):
    """Render with the LoRA at `weight` (0: the base model), then restore the trained scale."""
    layers = list(_lora_layers(model))
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


@contextlib.contextmanager
def eval_mode(model):
    modules = [model.unet, *model.text_encoders]
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


def render(model, prompts: list[str], *, seed: int, steps: int, size: int, weight: float = 1.0) -> list:
    """One PIL image per prompt; prompt i always uses seed + i."""
    import torch

    pipe = build_pipeline(model)
    images = []
    with torch.no_grad(), eval_mode(model), lora_weight(model, weight):
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            images.append(pipe(prompt, num_inference_steps=steps, height=size, width=size,
                               generator=generator, guidance_scale=7.0).images[0])
    return images


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
