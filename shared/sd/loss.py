"""The diffusion training loss of the SD family: noise the latents at random timesteps, predict the
noise (or v), with optional offset noise and min-SNR weighting (SNR from diffusers' `compute_snr`)."""

from __future__ import annotations


def noise_losses(model, latents, encoder_hidden_states, generator=None, *, noise_offset: float = 0.0,
                 min_snr_gamma: float | None = None, unet_extra: dict | None = None, unet=None, mask=None,
                 unmasked_weight: float = 0.0, normalize_mask: bool = False, timesteps=None):
    """The loss of each sample (a vector of the batch's length).

    `mask` ([batch, 1, h, w] on the latent grid, shared/sd/masks.py) weights each latent pixel's error
    (`unmasked_weight`, `normalize_mask`: masks.masked_loss); None weights them all alike.

    `generator` is one generator for the batch, or a list with one per sample (the trainer's way: a
    sample's noise then depends on the sample alone, not on which process or batch slot it lands in).
    `unet` is the module to call (the data-parallel wrapper); default model.unet. `timesteps` (one per
    sample) replaces the random ones (the validation loss scores fixed timesteps)."""
    import torch
    import torch.nn.functional as F

    from shared.sd.masks import masked_loss

    sched = model.noise_scheduler
    device = latents.device
    per_sample = isinstance(generator, (list, tuple))

    def draw(fn, shape):
        if per_sample:
            return torch.cat([fn((1, *shape[1:]), generator=g) for g in generator])
        return fn(shape, generator=generator)

    noise = draw(torch.randn, latents.shape).to(device, latents.dtype)
    if noise_offset:
        # a per-channel shift of the noise lets the model learn overall brightness
        noise = noise + noise_offset * draw(torch.randn, (*latents.shape[:2], 1, 1)).to(device)
    steps = sched.config.num_train_timesteps
    if timesteps is None:
        timesteps = draw(lambda shape, generator: torch.randint(0, steps, shape, generator=generator),
                         (latents.shape[0],)).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = (unet or model.unet)(noisy, timesteps, encoder_hidden_states, **(unet_extra or {})).sample
    v = model.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v else noise
    loss = masked_loss(F.mse_loss(pred.float(), target.float(), reduction="none"), mask,
                       unmasked_weight=unmasked_weight, normalize=normalize_mask)
    if min_snr_gamma:
        from diffusers.training_utils import compute_snr

        # Min-SNR-gamma (Hang et al.): min(snr, gamma) / snr for epsilon, / (snr + 1) for v
        snr = compute_snr(sched, timesteps)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v else snr)
    return loss


def noise_loss(model, latents, encoder_hidden_states, generator=None, **options):
    """The batch's mean loss (see `noise_losses` for the arguments)."""
    return noise_losses(model, latents, encoder_hidden_states, generator, **options).mean()
