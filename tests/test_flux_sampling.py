"""Flux previews (issue 19): FluxPipeline from our loaded components, schnell/dev defaults, the LoRA
weight honoured, and prompts from the text cache once the encoders are freed."""

from __future__ import annotations

import numpy as np
import torch

from shared.flux.lora import inject_flux_lora, select_targets
from shared.flux.sampling import PREVIEW_DEFAULTS, render
from shared.flux.text_cache import TextCache


def _arr(image):
    return np.asarray(image, dtype=np.float32)


def test_previews_render_with_the_lora_and_from_the_cache(tiny_flux):
    from shared.flux.base_model import load_flux_model

    model = load_flux_model(tiny_flux["comfy"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                            model_config=tiny_flux["model_config"], dtype=torch.float32)
    inject_flux_lora(model.transformer, select_targets(model.transformer.config), rank=4, alpha=4.0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    prompts = ["a photo of sks dog"]
    base = render(model, prompts, seed=1, size=64, steps=2, weight=0.0)
    full = render(model, prompts, seed=1, size=64, steps=2)
    again = render(model, prompts, seed=1, size=64, steps=2)
    assert base[0].size == (64, 64)
    assert np.abs(_arr(full[0]) - _arr(base[0])).max() > 0  # the LoRA shows
    assert np.array_equal(_arr(full[0]), _arr(again[0]))  # a fixed seed gives the same image
    cache = TextCache("fp", model.tokenizer_2.model_max_length)
    cache.fill(model, prompts)
    cached = render(model, prompts, seed=1, size=64, steps=2, text_cache=cache)
    assert np.abs(_arr(cached[0]) - _arr(full[0])).max() <= 2  # same embeddings, up to rounding
    assert PREVIEW_DEFAULTS["schnell"]["steps"] <= 4 and PREVIEW_DEFAULTS["dev"]["guidance"] == 3.5


def test_schnell_previews_use_few_steps(tiny_flux_schnell):
    from shared.flux.base_model import load_flux_model

    p = tiny_flux_schnell
    model = load_flux_model(p["transformer_fp8"], ae=p["ae"], clip_l=p["clip_l"], t5xxl=p["t5xxl"],
                            t5_tokenizer=p["t5_tokenizer"], model_config=p["model_config"], fp8_base=True,
                            dtype=torch.bfloat16)
    images = render(model, ["a red car"], seed=0, size=64)
    assert images[0].size == (64, 64) and _arr(images[0]).std() > 0
