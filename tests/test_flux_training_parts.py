"""The pieces a Flux training task calls (issue 19): text encoding, VAE latents, 2x2 packing with
position ids, timestep sampling, the flow-matching input/target and the loss of a batch."""

from __future__ import annotations

import math

import pytest
import torch

from shared.flux import conditioning as C
from shared.flux import flow_matching as FM


def test_text_encoding_is_t5_states_plus_clip_pooled(flux_model):
    m = flux_model
    text = C.encode_text(m, ["a photo of sks dog", "a red car"])
    t5_len = m.tokenizer_2.model_max_length
    assert t5_len == 512
    assert text.prompt_embeds.shape == (2, t5_len, m.text_encoder_2.config.d_model)
    assert text.pooled.shape == (2, m.text_encoder.config.hidden_size)
    assert text.text_ids.shape == (t5_len, 3) and not text.text_ids.any()
    with torch.no_grad():
        ids = m.tokenizer_2(["a photo of sks dog"], padding="max_length", max_length=t5_len, truncation=True,
                            return_tensors="pt").input_ids
        t5 = m.text_encoder_2(ids)[0]
        clip_ids = m.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        pooled = m.text_encoder(clip_ids).pooler_output
    assert torch.allclose(text.prompt_embeds[0], t5[0], atol=1e-5)
    assert torch.allclose(text.pooled[0], pooled[0], atol=1e-5)
    assert not torch.allclose(text.pooled[0], text.pooled[1])


def test_vae_latents_are_shifted_and_scaled(flux_model):
    vae = flux_model.vae
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    params = C.latent_params(vae, pixels)
    assert params.shape == (1, 32, 8, 8)
    g = [torch.Generator().manual_seed(3)]
    latents = C.sample_latents(vae.config, params, g)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    raw = DiagonalGaussianDistribution(params).sample(generator=torch.Generator().manual_seed(3))
    assert torch.allclose(latents, (raw - 0.1159) * 0.3611)
    with torch.no_grad():
        decoded = C.decode_latents(vae, latents)
        direct = vae.decode(raw).sample
    assert torch.allclose(decoded, direct, atol=1e-5)


def test_packing_is_2x2_patches_with_row_column_ids():
    x = torch.randn(2, 16, 6, 8)
    tokens = C.pack(x)
    assert tokens.shape == (2, 3 * 4, 64)
    r, c = 1, 2
    k = r * 4 + c
    assert torch.equal(tokens[0, k], x[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(-1))
    ids = C.image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[k].tolist() == [0.0, r, c]
    assert torch.equal(C.unpack(tokens, 6, 8), x)
    with pytest.raises(ValueError, match="even"):
        C.pack(torch.randn(1, 16, 5, 8))


def _median(method, n=4000, **kw):
    return FM.sample_sigmas(n, method, generators=torch.Generator().manual_seed(0), **kw).median().item()


def test_timestep_sampling_choices_have_their_distributions(flux_model):
    assert abs(_median("uniform") - 0.5) < 0.03
    assert abs(_median("sigmoid") - 0.5) < 0.03
    assert abs(_median("logit_normal", logit_mean=1.0) - 1 / (1 + math.exp(-1))) < 0.03
    assert abs(_median("shift", shift=3.0) - 0.75) < 0.03
    sched = flux_model.scheduler
    lo = _median("flux_shift", seq_len=256, scheduler=sched)  # mu 0.5
    hi = _median("flux_shift", seq_len=4096, scheduler=sched)  # mu 1.15
    assert abs(lo - math.exp(0.5) / (math.exp(0.5) + 1)) < 0.03
    assert abs(hi - math.exp(1.15) / (math.exp(1.15) + 1)) < 0.03
    wide = FM.sample_sigmas(4000, "sigmoid", sigmoid_scale=3.0, generators=torch.Generator().manual_seed(0))
    narrow = FM.sample_sigmas(4000, "sigmoid", generators=torch.Generator().manual_seed(0))
    assert wide.std() > narrow.std()
    for method in FM.TIMESTEP_SAMPLING:
        s = FM.sample_sigmas(500, method, generators=torch.Generator().manual_seed(1), seq_len=16, scheduler=sched)
        assert 0 < s.min() and s.max() < 1
    with pytest.raises(ValueError, match="timestep_sampling"):
        FM.sample_sigmas(2, "cosine")
    with pytest.raises(ValueError, match="flux_shift needs"):
        FM.sample_sigmas(2, "flux_shift")


def test_per_sample_generators_make_each_draw_independent_of_the_batch():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = FM.sample_sigmas(2, "sigmoid", generators=gens)
    alone = FM.sample_sigmas(1, "sigmoid", generators=[torch.Generator().manual_seed(6)])
    assert both[1] == alone[0]


def test_noisy_input_runs_from_latents_to_noise():
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    noisy, target = FM.noisy_input_and_target(latents, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[1], noise[1])
    assert torch.allclose(noisy[2], 0.75 * latents[2] + 0.25 * noise[2])
    assert torch.equal(target, noise - latents)


def test_guidance_is_for_dev_only(flux_model, tiny_flux_schnell):
    from shared.fixtures.tiny_flux import build_tiny_flux_components

    g = FM.guidance(flux_model.transformer, 2, 3.5)
    assert g.tolist() == [3.5, 3.5]
    schnell = build_tiny_flux_components("schnell")[0]
    assert FM.guidance(schnell, 2, 3.5) is None


def _batch(flux_model):
    text = C.encode_text(flux_model, ["a photo of sks dog", "a red car"])
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    return latents, text


def test_the_loss_of_a_batch_is_the_mean_of_its_samples(flux_model):
    latents, text = _batch(flux_model)
    tr = flux_model.transformer
    with torch.no_grad():
        both = FM.flow_matching_loss(tr, latents, text, [torch.Generator().manual_seed(s) for s in (1, 2)],
                                     timestep_sampling="flux_shift", scheduler=flux_model.scheduler)
        one = [FM.flow_matching_loss(tr, latents[i : i + 1], C.FluxText.stack([C.FluxText(
            text.prompt_embeds[i : i + 1], text.pooled[i : i + 1], text.text_ids)]),
            [torch.Generator().manual_seed(s)], timestep_sampling="flux_shift", scheduler=flux_model.scheduler)
            for i, s in ((0, 1), (1, 2))]
    assert torch.isfinite(both)
    assert abs(both.item() - (one[0].item() + one[1].item()) / 2) < 1e-5


def test_guidance_value_reaches_the_dev_prediction(flux_model):
    latents, text = _batch(flux_model)
    sigmas = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a = FM.predict(flux_model.transformer, latents, sigmas, text, guidance_scale=1.0)
        b = FM.predict(flux_model.transformer, latents, sigmas, text, guidance_scale=3.5)
    assert a.shape == latents.shape and not torch.allclose(a, b)
