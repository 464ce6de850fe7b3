"""What the Flux transformer is conditioned on and how its image input is laid out.

Text: T5's last hidden states are the transformer's text tokens (512 for dev, 256 for schnell) and
CLIP-L's pooled output its global vector; both come from diffusers' own `FluxPipeline.encode_prompt`,
so training sees exactly what sampling does. Image: VAE latents, shifted and scaled by the Flux
autoencoder's config (0.1159 / 0.3611), then packed 2x2 into tokens of 4 x 16 channels with
(0, row, column) position ids; the text tokens get all-zero ids. The packing and ids are diffusers'
FluxPipeline helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FluxText:
    """One caption (or a batch) as the transformer takes it."""

    prompt_embeds: torch.Tensor  # [B, T5 tokens, T5 width]
    pooled: torch.Tensor  # [B, CLIP-L width]
    text_ids: torch.Tensor  # [T5 tokens, 3], all zero

    def to(self, device=None, dtype=None) -> FluxText:
        return FluxText(self.prompt_embeds.to(device, dtype), self.pooled.to(device, dtype), self.text_ids.to(device))

    @staticmethod
    def stack(items: list[FluxText]) -> FluxText:
        return FluxText(torch.cat([i.prompt_embeds for i in items]), torch.cat([i.pooled for i in items]), items[0].text_ids)


def text_pipeline(model):
    """A FluxPipeline holding only the text side (for encode_prompt)."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=model.scheduler, vae=None, text_encoder=model.text_encoder,
                        tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
                        tokenizer_2=model.tokenizer_2, transformer=None)


def encode_text(model, captions: list[str], *, max_sequence_length: int | None = None, device=None) -> FluxText:
    """T5 hidden states + CLIP-L pooled output for `captions` (gradients flow when the encoders train)."""
    pipe = text_pipeline(model)
    device = device or next(model.text_encoder_2.parameters()).device
    length = max_sequence_length or model.tokenizer_2.model_max_length
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=captions, prompt_2=captions, device=device,
                                                         num_images_per_prompt=1, max_sequence_length=length)
    return FluxText(prompt_embeds, pooled, text_ids)


def clip_pooled(model, captions: list[str], device=None) -> torch.Tensor:
    """CLIP-L's pooled output for `captions`, tokenized as FluxPipeline.encode_prompt does (77 tokens):
    the part of the conditioning a trained CLIP-L LoRA changes, computed each step with gradients while
    the T5 states come from the cache."""
    device = device or next(model.text_encoder.parameters()).device
    ids = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return model.text_encoder(ids.to(device), output_hidden_states=False).pooler_output


def latent_params(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution (mean and log-variance, [B, 2x16, h, w]) of pixels in [-1, 1]:
    what a latent cache stores, so a cached step samples exactly what an uncached one does."""
    with torch.no_grad():
        return vae.encode(pixels.to(next(vae.parameters()).device, vae.dtype)).latent_dist.parameters.float()


def sample_latents(vae_config, params: torch.Tensor, generators=None) -> torch.Tensor:
    """Sample latents from `latent_params` and apply Flux's shift and scale: (z - 0.1159) * 0.3611.
    `generators`: one per sample (a sample's latent then depends on it alone) or None."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if generators is None:
        z = DiagonalGaussianDistribution(params).sample()
    else:
        z = torch.cat([DiagonalGaussianDistribution(params[i : i + 1].cpu()).sample(generator=g)
                       for i, g in enumerate(generators)]).to(params.device)
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def encode_images(vae, pixels: torch.Tensor, generators=None) -> torch.Tensor:
    """Shifted and scaled Flux latents of pixels in [-1, 1]."""
    return sample_latents(vae.config, latent_params(vae, pixels), generators)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from shifted and scaled latents."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens (2x2 patches, row-major)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w}: Flux packs 2x2 patches, so both sides must be even")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `latent_height` x `latent_width`."""
    from diffusers import FluxPipeline

    # the helper takes pixel sizes and its VAE factor; factor 1 makes pixels == latents
    return FluxPipeline._unpack_latents(tokens, latent_height, latent_width, 1)


def image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[H/2 * W/2, 3] position ids of the packed tokens: (0, row, column)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, dtype)


def image_seq_len(latent_height: int, latent_width: int) -> int:
    return (latent_height // 2) * (latent_width // 2)
