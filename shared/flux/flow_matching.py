"""The Flux training objective: rectified flow (flow matching) on packed latents.

A sample at noise level sigma in [0, 1] is x_sigma = (1 - sigma) * latents + sigma * noise; the
transformer, given sigma as its timestep (and, for dev, a guidance value), predicts the velocity
noise - latents, and the loss is the mean squared error of that prediction (kohya's `raw`
prediction type, diffusers' Flux LoRA example). How sigma is drawn is the main knob the leading
trainers offer (kohya's `--timestep_sampling`, diffusers' `--weighting_scheme`):

- uniform: sigma ~ U(0, 1)
- sigmoid: sigmoid(scale * N(0, 1)) (x-flux, ai-toolkit; kohya's sigmoid)
- logit_normal: sigmoid(N(mean, std)) (SD3's paper; diffusers' logit_normal)
- shift: the sigmoid draw moved towards noise by a fixed shift s: s*t / (1 + (s - 1)*t) (kohya's
  shift with --discrete_flow_shift, 3.1582 in its recommended settings)
- flux_shift: the sigmoid draw shifted by the resolution-dependent mu that FLUX.1-dev sampling uses
  (0.5 at 256 packed tokens to 1.15 at 4096, diffusers' `calculate_shift`), through the scheduler's
  exponential time shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.flux.conditioning import FluxText, image_ids, image_seq_len, pack, unpack
from shared.schema import flux as schema_flux

TIMESTEP_SAMPLING = schema_flux.TIMESTEP_SAMPLING  # the timestep_sampling setting's choices
DEV_TRAINING_GUIDANCE = 1.0  # kohya's recommended --guidance_scale for training dev (3.5 is for sampling)


def _normal(n: int, generators) -> torch.Tensor:
    """n standard normals, one draw per sample's generator when a list is given."""
    if isinstance(generators, (list, tuple)):
        return torch.cat([torch.randn(1, generator=g) for g in generators])
    return torch.randn(n, generator=generators)


def _uniform(n: int, generators) -> torch.Tensor:
    if isinstance(generators, (list, tuple)):
        return torch.cat([torch.rand(1, generator=g) for g in generators])
    return torch.rand(n, generator=generators)


def sample_sigmas(n: int, method: str = "shift", *, generators=None, sigmoid_scale: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 3.1582,
                  seq_len: int | None = None, scheduler=None) -> torch.Tensor:
    """n noise levels in (0, 1) drawn by `method` (see the module doc). `seq_len` (packed image
    tokens) and `scheduler` (its base/max shift config) are needed by flux_shift.

    diffusers' compute_density_for_timestep_sampling draws logit-normal too, but from the global RNG;
    here every draw takes the sample's own generator, so a sample's noise level does not depend on
    which process or batch slot it lands in."""
    if method == "uniform":
        sigmas = _uniform(n, generators)
    elif method == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * _normal(n, generators))
    elif method in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(sigmoid_scale * _normal(n, generators))
        if method == "shift":
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        elif method == "flux_shift":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            if seq_len is None or scheduler is None:
                raise ValueError("flux_shift needs the packed sequence length and the scheduler")
            c = scheduler.config
            mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            sigmas = scheduler.time_shift(mu, 1.0, sigmas)
    else:
        raise ValueError(f"timestep_sampling: {method!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")
    return sigmas.clamp(1e-5, 1.0 - 1e-5)


def noisy_input_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """(x_sigma, velocity target) for [B, C, H, W] latents and one sigma per sample."""
    s = sigmas.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    return (1 - s) * latents + s * noise, noise - latents


def guidance(transformer, batch: int, scale: float, device=None) -> torch.Tensor | None:
    """The guidance embedding's input for dev (guidance-distilled); None for schnell."""
    if not transformer.config.guidance_embeds:
        return None
    return torch.full((batch,), float(scale), device=device, dtype=torch.float32)


def predict(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, text: FluxText,
            guidance_scale: float = DEV_TRAINING_GUIDANCE) -> torch.Tensor:
    """The transformer's velocity prediction for [B, C, H, W] noisy latents, as [B, C, H, W]."""
    b, _, h, w = noisy.shape
    device = noisy.device
    dtype = text.prompt_embeds.dtype
    out = transformer(
        hidden_states=pack(noisy).to(dtype),
        timestep=sigmas.to(device, dtype),  # diffusers' Flux takes sigma (timestep / 1000)
        guidance=guidance(transformer, b, guidance_scale, device),
        pooled_projections=text.pooled,
        encoder_hidden_states=text.prompt_embeds,
        txt_ids=text.text_ids.to(device),
        img_ids=image_ids(h, w, device, dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def flow_matching_loss(transformer, latents: torch.Tensor, text: FluxText, generators=None, *,
                       timestep_sampling: str = "shift", guidance_scale: float = DEV_TRAINING_GUIDANCE,
                       scheduler=None, sigmoid_scale: float = 1.0, logit_mean: float = 0.0,
                       logit_std: float = 1.0, shift: float = 3.1582) -> torch.Tensor:
    """The mean flow-matching loss of a batch of shifted and scaled latents with their text.

    `generators` is one generator or one per sample (noise and sigma of a sample then depend on it
    alone). `transformer` is the module to call (a data-parallel wrapper works)."""
    b, _, h, w = latents.shape
    if isinstance(generators, (list, tuple)):
        noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in generators])
    else:
        noise = torch.randn(latents.shape, generator=generators)
    noise = noise.to(latents.device, latents.dtype)
    sigmas = sample_sigmas(b, timestep_sampling, generators=generators, sigmoid_scale=sigmoid_scale,
                           logit_mean=logit_mean, logit_std=logit_std, shift=shift, seq_len=image_seq_len(h, w),
                           scheduler=scheduler)
    noisy, target = noisy_input_and_target(latents, noise, sigmas)
    pred = predict(transformer, noisy, sigmas.to(latents.device), text, guidance_scale)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]).mean()
