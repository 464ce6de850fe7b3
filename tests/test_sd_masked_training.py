"""Masked loss through the SD task (issue 20): with a mask that zeroes the left half of every image, the
LoRA's gradient gets nothing from the left half's pixels (changing the prediction there changes no
gradient, while changing it on the right half does), whichever way the mask is given; the masks follow
the latent cache; the options are refused without `masked_loss`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shared.errors import ConfigError
from shared.preflight import load_config
from shared.sd.task import SDTask
from shared.training.precision import setup_precision
from tests.test_llm_training import Recorder


def _left_black(size=(64, 64)) -> Image.Image:
    mask = Image.new("L", size, 255)
    mask.paste(0, (0, 0, size[0] // 2, size[1]))
    return mask


def _masks(image_dir, tmp_path, source: str) -> dict:
    """Give every image a left-black mask the `source` way; the config keys that read it."""
    images = sorted(p for p in image_dir.glob("*.png"))
    if source == "beside":
        for image in images:
            _left_black().save(image.with_name(image.stem + ".mask.png"))
        return {}
    if source == "dir":
        folder = tmp_path / "masks"
        folder.mkdir()
        for image in images:
            _left_black().convert("RGB").save(folder / (image.stem + ".png"))  # read from the red channel
        return {"mask_dir": folder}
    for image in images:  # alpha: transparent on the left
        with Image.open(image) as img:
            rgba = img.convert("RGBA")
        rgba.putalpha(_left_black())
        rgba.save(image)
    return {"mask_from_alpha": True}


def _task(cfg) -> SDTask:
    task = SDTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    task.build_caches()
    return task


def _gradients(task, samples, shift_columns: slice | None = None) -> list:
    """The adapter's gradients for `samples`; `shift_columns`: add 3 to the UNet's prediction there."""
    unet = task.model.unet
    hook = None
    if shift_columns is not None:
        def shift(module, args, output):
            bump = torch.zeros_like(output)
            bump[..., shift_columns] = 3.0
            return output + bump

        hook = unet.conv_out.register_forward_hook(shift)
    try:
        summed, _ = task.loss(samples, [unet])
        summed.backward()
    finally:
        if hook is not None:
            hook.remove()
    grads = [p.grad.detach().clone() for p in task.unet_params]
    for p in task.unet_params:
        p.grad = None
    return grads


@pytest.mark.parametrize("source", ["beside", "dir", "alpha"])
def test_a_left_half_mask_gives_no_gradient_from_the_left_half(sd_config, image_dir, tmp_path, source):
    keys = _masks(image_dir, tmp_path, source)
    cfg = load_config(sd_config(masked_loss=True, lora_dropout=0.0, random_flip=False, **keys))
    task = _task(cfg)
    samples = task.epoch_batches(0, 2)[0]
    assert task.data.plan.buckets[samples[0].index] == (64, 64)  # latent grid 8 x 8: columns 0-3 are the left half
    base = _gradients(task, samples)
    assert any(g.abs().sum() > 0 for g in base)
    left = _gradients(task, samples, slice(0, 4))
    assert all(torch.equal(a, b) for a, b in zip(base, left))  # the left half's pixels give nothing
    right = _gradients(task, samples, slice(4, 8))
    assert any(not torch.equal(a, b) for a, b in zip(base, right))  # the right half's do
    # control: without the mask, the left half's pixels count
    plain = _task(load_config(sd_config(lora_dropout=0.0, random_flip=False)))
    unmasked = [_gradients(plain, samples), _gradients(plain, samples, slice(0, 4))]
    assert any(not torch.equal(a, b) for a, b in zip(*unmasked))


def test_masks_follow_the_latent_cache_and_weight_the_unmasked_part(sd_config, image_dir, tmp_path):
    _masks(image_dir, tmp_path, "beside")
    losses = {}
    for name, extra in {"plain": {}, "cached": {"cache_latents": "memory"}, "kept": {"unmasked_weight": 0.5},
                        "normalized": {"normalize_masked_area_loss": True}}.items():
        task = _task(load_config(sd_config(masked_loss=True, lora_dropout=0.0, random_flip=False, **extra)))
        with torch.no_grad():
            losses[name] = task.loss(task.epoch_batches(0, 2)[0], [task.model.unet])[0].item()
    unmasked = _task(load_config(sd_config(lora_dropout=0.0, random_flip=False)))
    with torch.no_grad():
        full = unmasked.loss(unmasked.epoch_batches(0, 2)[0], [unmasked.model.unet])[0].item()
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["plain"] < losses["kept"] < full  # half the weight kept where the mask is black
    assert losses["normalized"] == pytest.approx(2 * losses["plain"], rel=1e-5)  # the masks' mean weight is 1/2


def test_mask_options_need_masked_loss(sd_config, tmp_path):
    with pytest.raises(ConfigError, match="mask_from_alpha has no effect without masked_loss: true"):
        load_config(sd_config(mask_from_alpha=True))
