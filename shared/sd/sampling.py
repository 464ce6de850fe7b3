"""Images people can look at: samples during training, the before/after grid and the preview at the end.

Samples use the model being trained (LoRA layers in place), an Euler scheduler built from the
training scheduler's config (so v-prediction models sample right) and a fixed seed per prompt, so
the images of successive steps differ only by what was learned.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from shared.images.previews import before_after_grid as grid_of
from shared.images.previews import latents_in, save_png
from shared.images.previews import lora_weight as layers_at
from shared.training.task import Samples

SAMPLE_STEPS = 20  # sample_steps when not set: Euler's usual count for SD
# The evaluation's prompt that has nothing to do with the training data: what the LoRA does to
# everything else (a character LoRA that paints its character into a street scene has collapsed).
UNRELATED_PROMPT = "a photograph of a city street at night, cars and people"


def sample_steps(cfg) -> int:
    return cfg.sample_steps or SAMPLE_STEPS


def build_pipeline(model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    # None: the text encoders were freed after the text cache (the pipelines then take prompt embeddings)
    encoders = [*model.text_encoders, None, None][:2]
    if model.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def lora_weight(model, weight: float):
    """Render with the LoRA at `weight` (0: the base model): its LoRA / DoRA layers
    (shared/images/previews.py) and LoHa / LoKr multipliers, then the trained scale back."""
    from shared.sd.lycoris import set_lycoris_weight

    modules = [model.unet, *model.text_encoders]
    set_lycoris_weight(modules, weight)
    try:
        with layers_at(modules, weight):
            yield
    finally:
        set_lycoris_weight(modules, 1.0)


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


def _cached_embeds(model, conditioning: dict, prompt: str) -> dict:
    """The pipeline's embedding arguments for `prompt` from the text-encoder cache (no encoder runs)."""
    device, dtype = model.unet.device, model.unet.dtype
    hidden, pooled = conditioning[prompt]
    kwargs = {"prompt_embeds": hidden[None].to(device, dtype)}
    if model.is_sdxl:  # the SDXL pipeline then uses zeros for the empty negative prompt, as it does uncached
        kwargs["pooled_prompt_embeds"] = pooled[None].to(device, dtype)
    else:
        kwargs["negative_prompt_embeds"] = conditioning[""][0][None].to(device, dtype)
    return kwargs


def render(model, prompts: list[str], *, seed: int, steps: int, size: int, weight: float = 1.0,
           conditioning: dict | None = None) -> list:
    """One PIL image per prompt; prompt i always uses seed + i. With `conditioning` (the text-encoder
    cache: prompt -> (hidden states, pooled), "" included) the text encoders do not run."""
    return render_seeds(model, prompts, [seed + i for i in range(len(prompts))], steps=steps, size=size,
                        weight=weight, conditioning=conditioning)


def render_seeds(model, prompts: list[str], seeds: list[int], *, steps: int, size: int, weight: float = 1.0,
                 conditioning: dict | None = None) -> list:
    """One PIL image per (prompt, seed) pair, at LoRA weight `weight` (0: the base model)."""
    import torch

    pipe = build_pipeline(model)
    types = latents_in(model.unet.dtype, model.vae.dtype)
    images = []
    with torch.no_grad(), eval_mode(model), lora_weight(model, weight):
        for prompt, seed in zip(prompts, seeds, strict=True):
            generator = torch.Generator("cpu").manual_seed(seed)
            text = {"prompt": prompt} if conditioning is None else _cached_embeds(model, conditioning, prompt)
            images.append(pipe(**text, num_inference_steps=steps, height=size, width=size, generator=generator,
                               guidance_scale=7.0, **types).images[0])
    return images


def _on_device(model, device) -> None:
    """The text encoders back on the device if the text cache sent them away (the pipeline takes
    its device from its modules, even when no encoder runs)."""
    for encoder in model.text_encoders:
        encoder.to(device)


def render_samples(model, cfg, device, step: int, folder: Path, conditioning: dict | None = None) -> Samples:
    """`sample_prompts` at the trained weights into `folder/stepNNNNNN-II.png`."""
    _on_device(model, device)
    images = render(model, cfg.sample_prompts, seed=cfg.seed, steps=sample_steps(cfg), size=cfg.resolution,
                    conditioning=conditioning)
    paths = [save_png(folder / f"step{step:06d}-{i:02d}.png", image) for i, image in enumerate(images)]
    return Samples(paths=paths, prompts=list(cfg.sample_prompts), images=images)


def before_after_grid(model, cfg, device, path: Path, conditioning: dict | None = None):
    """Write the grid of every sample prompt at LoRA weight 0 (the base), 0.5, 0.8 and 1.0 to `path`;
    returns the first prompt's image at the weight nearest `preferred_weight` (the preview)."""
    _on_device(model, device)

    def at(prompts: list[str], weight: float) -> list:
        return render(model, prompts, seed=cfg.seed, steps=sample_steps(cfg), size=cfg.resolution, weight=weight,
                      conditioning=conditioning)

    return grid_of(at, cfg.sample_prompts, path, cfg.preferred_weight)


def preview_image(model, cfg, device, prompt: str, conditioning: dict | None = None):
    """One image of `prompt` at `preferred_weight`: the card picture of a LoRA trained without
    sample prompts (the prompt is then a training caption)."""
    _on_device(model, device)
    return render(model, [prompt], seed=cfg.seed, steps=sample_steps(cfg), size=cfg.resolution,
                  weight=cfg.preferred_weight, conditioning=conditioning)[0]


def evaluation_images(model, cfg, device, prompts: list[str], seeds: list[int], weight: float,
                      conditioning: dict | None = None) -> list:
    """The evaluation's pictures (shared/evaluation): each prompt at its seed, the training resolution
    and `eval_sample_steps`, with the LoRA at `weight`."""
    _on_device(model, device)
    return render_seeds(model, prompts, seeds, steps=cfg.eval_sample_steps, size=cfg.resolution, weight=weight,
                        conditioning=conditioning)


def evaluation_prompts(data, count: int) -> list[str]:
    """Without sample prompts: up to `count - 1` distinct training captions, spread over the data set,
    and one prompt unrelated to it."""
    n, want = len(data.items), max(1, count - 1)
    spread = [round(k * (n - 1) / (want - 1)) for k in range(want)] if want > 1 else [0]
    captions: list[str] = []
    for i in [*spread, *range(n)]:  # duplicates in the spread: the next distinct captions in order
        caption = data.fixed_caption(i)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == want:
            break
    return [*captions, UNRELATED_PROMPT]
