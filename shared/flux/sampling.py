"""Preview images from the model being trained: diffusers' FluxPipeline built from our components.

Few steps with each variant's usual settings: schnell (timestep-distilled) 4 steps and no guidance,
dev 20 steps with guidance 3.5 (its distilled guidance embedding; there is no negative prompt pass).
A fixed seed per prompt makes successive previews differ only by what was learned. With the text
encoders freed after caching, prompts are taken from the text cache instead.
"""

from __future__ import annotations

PREVIEW_DEFAULTS = {"schnell": {"steps": 4, "guidance": 0.0}, "dev": {"steps": 20, "guidance": 3.5}}


def build_pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    # an encoder freed after caching (its weights on the meta device) is left out: the pipeline would
    # take its device from it, and prompts then come as embeddings
    encoders = [None if e is None or next(e.parameters()).device.type == "meta" else e
                for e in (model.text_encoder, model.text_encoder_2)]
    pipe = FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=encoders[0], tokenizer=model.tokenizer,
                        text_encoder_2=encoders[1], tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(model, prompts: list[str], *, seed: int, size: int, steps: int | None = None,
           guidance: float | None = None, weight: float = 1.0, text_cache=None) -> list:
    """One PIL image per prompt (prompt i uses seed + i), the LoRA at `weight` (0: the base)."""
    import torch

    from shared.images.previews import latents_in, lora_weight

    defaults = PREVIEW_DEFAULTS[model.variant]
    steps = steps or defaults["steps"]
    guidance = defaults["guidance"] if guidance is None else guidance
    pipe = build_pipeline(model)
    device = next(p.device for p in model.transformer.parameters() if p.device.type != "meta")
    dtype = model.vae.dtype
    modules = [model.transformer, model.text_encoder]
    images = []
    was_training = model.transformer.training
    model.transformer.eval()
    try:
        with torch.no_grad(), lora_weight(modules, weight):
            for i, prompt in enumerate(prompts):
                kwargs = {"prompt": prompt}
                if text_cache is not None:
                    text = text_cache.batch([prompt], device=device, dtype=dtype)
                    kwargs = {"prompt_embeds": text.prompt_embeds, "pooled_prompt_embeds": text.pooled}
                generator = torch.Generator("cpu").manual_seed(seed + i)
                images.append(pipe(**kwargs, height=size, width=size, num_inference_steps=steps,
                                   guidance_scale=guidance, generator=generator,
                                   max_sequence_length=model.tokenizer_2.model_max_length,
                                   **latents_in(dtype, model.vae.dtype)).images[0])
    finally:
        model.transformer.train(was_training)
    return images
