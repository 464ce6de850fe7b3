"""Masked loss (issue 20): a mask beside the image (or its alpha channel) follows the image's resize, crop and
flip, lands on the latent grid, and where it is 0 the target has no effect on the LoRA's gradient."""

import numpy as np
import pytest
import torch
from PIL import Image

from shared.errors import DatasetError
from shared.fixtures.tiny_sd import build_tiny_sd15_components
from shared.images.dataset import load_pixels, plan_crop, scan_dataset
from shared.images.lora import inject_lora, kohya_unet_targets
from shared.sd.masks import batch_masks, find_mask, load_mask, masked_loss


def _image_and_mask(folder, name="pic", mask_name=None):
    """A 96x64 image brighter to the right, and a mask white on the right half of the centre crop."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.tile(np.linspace(0, 255, 96, dtype=np.float32), (64, 1))
    Image.fromarray(np.stack([x] * 3, -1).astype(np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, 48:] = 255  # the centre 64x64 crop starts at x=16: its right half is x >= 48
    Image.fromarray(np.stack([mask, mask // 2, mask // 3], -1)).save(folder / (mask_name or f"{name}.mask.png"))
    return folder / f"{name}.png"


def test_mask_is_cropped_and_flipped_with_its_image(tmp_path):
    image = _image_and_mask(tmp_path)
    resized, crop = plan_crop((96, 64), (64, 64), random_crop=False, rng=None)
    assert (resized, crop) == ((96, 64), (0, 16))
    for flip in (False, True):
        mask = load_mask(image, (64, 64), resized, crop, flip)
        pixels = load_pixels(image, (64, 64), resized, crop, flip)
        assert mask.shape == (1, 64, 64)
        left, right = (mask[0, :, :32], mask[0, :, 32:]) if not flip else (mask[0, :, 32:], mask[0, :, :32])
        assert left.max() == 0 and right.min() == 1  # the red channel, white trains
        # the mask's white pixels are the image's brighter half, whichever way it is mirrored
        assert pixels[0][mask[0] == 1].mean() > pixels[0][mask[0] == 0].mean()


def test_mask_sources(tmp_path):
    image = _image_and_mask(tmp_path / "a", mask_name="pic-masklabel.png")  # OneTrainer's name
    assert find_mask(image).name == "pic-masklabel.png"
    other = tmp_path / "masks"
    other.mkdir()
    Image.new("L", (96, 64), 255).save(other / "pic.png")  # kohya's: same stem in a mask folder, first
    assert find_mask(image, other) == other / "pic.png"
    assert load_mask(image, (64, 64), (96, 64), (0, 16), False, mask_dir=other).min() == 1
    # the alpha channel, when asked
    rgba = tmp_path / "b" / "alpha.png"
    rgba.parent.mkdir()
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    a[:, 32:, 3] = 255
    Image.fromarray(a).save(rgba)
    assert load_mask(rgba, (64, 64), (64, 64), (0, 0), False) is None
    mask = load_mask(rgba, (64, 64), (64, 64), (0, 0), False, from_alpha=True)
    assert mask[0, :, :32].max() == 0 and mask[0, :, 32:].min() == 1
    # a mask of another size is refused with its file named
    Image.new("L", (10, 10)).save(tmp_path / "a" / "pic.mask.png")
    with pytest.raises(DatasetError, match=r"pic.mask.png: the mask is 10x10 but its image pic.png is 96x64"):
        load_mask(image, (64, 64), (96, 64), (0, 16), False)


def test_masks_beside_images_are_not_trained_as_images(tmp_path):
    _image_and_mask(tmp_path / "d", "one")
    _image_and_mask(tmp_path / "d", "two", mask_name="two-masklabel.png")
    assert sorted(item.path.name for item in scan_dataset(tmp_path / "d").items) == ["one.png", "two.png"]


def _lora_grads(unet, params, latents, target, mask):
    unet.zero_grad()
    t = torch.tensor([500])
    cond = torch.zeros(1, 77, 32)
    pred = unet(latents, t, cond).sample
    per_pixel = torch.nn.functional.mse_loss(pred, target, reduction="none")
    masked_loss(per_pixel, mask).mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_left_half_masked_out_gives_its_pixels_no_gradient(tmp_path):
    image = _image_and_mask(tmp_path)
    resized, crop = plan_crop((96, 64), (64, 64), random_crop=False, rng=None)
    mask = batch_masks([load_mask(image, (64, 64), resized, crop, False)], (8, 8))
    assert mask.shape == (1, 1, 8, 8) and mask[..., :4].max() == 0 and mask[..., 4:].min() == 1

    unet, _, _ = build_tiny_sd15_components(0)
    torch.manual_seed(0)
    params = inject_lora(unet, kohya_unet_targets(unet), rank=4, alpha=4, dropout=0.0, init="gaussian")
    with torch.no_grad():  # a LoRA in training: B no longer zero, so A gets gradients too
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    latents, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    base = _lora_grads(unet, params, latents, target, mask)
    assert base.abs().max() > 0

    left, right = target.clone(), target.clone()
    left[..., :4] += 5 * torch.randn(1, 4, 8, 4, generator=g)
    right[..., 4:] += 5 * torch.randn(1, 4, 8, 4, generator=g)
    assert torch.equal(_lora_grads(unet, params, latents, left, mask), base)  # the left half counts for nothing
    assert not torch.allclose(_lora_grads(unet, params, latents, right, mask), base)  # the right half does
    # without the mask the left half counts
    assert not torch.allclose(_lora_grads(unet, params, latents, left, None), _lora_grads(unet, params, latents,
                                                                                          target, None))


def test_masked_loss_options():
    per_pixel = torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1
    assert torch.allclose(masked_loss(per_pixel, None), torch.ones(2))
    assert torch.allclose(masked_loss(per_pixel, mask), torch.full((2,), 0.5))
    assert torch.allclose(masked_loss(per_pixel, mask, unmasked_weight=0.2), torch.full((2,), 0.6))
    assert torch.allclose(masked_loss(per_pixel, mask, normalize=True), torch.ones(2))
    assert batch_masks([None, None], (8, 8)) is None
    half = batch_masks([mask[0], None], (4, 4))
    assert half[1].min() == 1 and half[0, :, :, :2].max() == 0
