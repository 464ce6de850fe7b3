"""Masked loss: a per-pixel weight for each training image, applied to the loss in latent space.

Where a mask comes from, first match wins:
- `mask_dir` (kohya's `conditioning_data_dir` way): a file with the image's stem and any image suffix
  in that folder;
- beside the image: `<stem>.mask.png`, or OneTrainer's `<stem>-masklabel.png`;
- `mask_from_alpha`: the image's own alpha channel (kohya's `alpha_mask`).
An image without any is trained on every pixel (a mask of ones). A mask is read from its red channel
(kohya's rule; a greyscale mask is the same): white trains, black is ignored, grey weights in between.
It is resized, cropped and mirrored exactly as its image (dataset.plan_crop / load_pixels) and
downsampled to the latent grid by area averaging, so a latent pixel's weight is the mean of the image
pixels it covers.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import DatasetError
from shared.images.dataset import IMAGE_SUFFIXES, MASK_SUFFIXES, fit_to_bucket


def find_mask(image: Path, mask_dir: Path | None = None) -> Path | None:
    image = Path(image)
    if mask_dir is not None:
        for suffix in IMAGE_SUFFIXES:
            for candidate in (Path(mask_dir) / (image.stem + suffix), Path(mask_dir) / (image.stem + suffix.upper())):
                if candidate.is_file():
                    return candidate
    for suffix in MASK_SUFFIXES:
        candidate = image.with_name(image.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def load_mask(image: Path, bucket: tuple[int, int], resized: tuple[int, int], crop: tuple[int, int], flip: bool,
              *, mask_dir: Path | None = None, from_alpha: bool = False):
    """The image's mask as a [1, h, w] tensor in [0, 1] at the bucket's size, or None when it has none.
    `bucket`, `resized`, `crop`, `flip` are the image's own (dataset.plan_crop, the step's flip)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    path = find_mask(image, mask_dir)
    try:
        if path is not None:
            # both as a viewer shows them (EXIF orientation applied), the way the trainer sees the image
            with Image.open(path) as mask_file, Image.open(image) as picture_file:
                img, picture = ImageOps.exif_transpose(mask_file), ImageOps.exif_transpose(picture_file)
                if img.size != picture.size:
                    raise DatasetError(f"{path}: the mask is {img.size[0]}x{img.size[1]} but its image {Path(image).name} "
                                       f"is {picture.size[0]}x{picture.size[1]}; masks must have the image's size")
                channel = img.convert("RGB").getchannel("R")
        elif from_alpha:
            with Image.open(image) as image_file:
                img = ImageOps.exif_transpose(image_file)
                if "A" not in img.getbands() and not (img.mode == "P" and "transparency" in img.info):
                    return None
                channel = img.convert("RGBA").getchannel("A")
        else:
            return None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path or image}: cannot read the mask ({exc})") from None
    channel = fit_to_bucket(channel, bucket, resized, crop, flip)
    return torch.from_numpy(np.asarray(channel, dtype=np.float32).copy())[None] / 255.0


def latent_mask(masks, latent_size: tuple[int, int]):
    """[batch, 1, h, w] pixel masks -> the latent grid (area average)."""
    import torch.nn.functional as F

    return F.interpolate(masks, size=latent_size, mode="area")


def batch_masks(masks: list, latent_size: tuple[int, int], device=None):
    """One [batch, 1, h, w] latent mask for a batch, ones for images without a mask; None if none has one."""
    import torch

    if all(m is None for m in masks):
        return None
    shape = next(m for m in masks if m is not None).shape
    full = torch.stack([m if m is not None else torch.ones(shape) for m in masks])
    return latent_mask(full, latent_size).to(device)


def masked_loss(per_pixel, mask, *, unmasked_weight: float = 0.0, normalize: bool = False):
    """Per-sample loss [batch] of a per-element loss [batch, c, h, w] weighted by a latent mask
    [batch, 1, h, w] (None: the plain mean). `unmasked_weight` keeps that share of the weight where
    the mask is 0 (OneTrainer's "unmasked weight"); `normalize` divides by the mean weight, so a small
    masked area does not train with a smaller effective learning rate."""
    if mask is None:
        return per_pixel.mean(dim=[1, 2, 3])
    weight = unmasked_weight + (1.0 - unmasked_weight) * mask.to(per_pixel.dtype)
    loss = (per_pixel * weight).mean(dim=[1, 2, 3])
    if normalize:
        loss = loss / weight.mean(dim=[1, 2, 3]).clamp_min(1e-6)
    return loss
