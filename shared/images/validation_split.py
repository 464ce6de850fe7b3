"""Which images an image job holds out for its validation loss: `validation_split` of the training images
(chosen with `validation_seed`, default `seed`; at least one image; regularisation images are never held
out) or the images of `validation_dir`. No torch here: the pre-flight (in the daemon) imports this module
to check the set before a job is queued; the SD task scores the set (shared/sd/validation.py).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from shared.errors import DatasetError
from shared.images.dataset import ImageItem, scan_dataset


def validation_seed(cfg) -> int:
    return cfg.seed if cfg.validation_seed is None else cfg.validation_seed


def held_out_count(fraction: float, images: int) -> int:
    """How many of `images` a split of `fraction` holds out (0 without a split); refuses one that leaves
    nothing to train on."""
    if fraction <= 0:
        return 0
    n = max(1, round(images * fraction))
    if n >= images:
        raise DatasetError(f"validation_split: {fraction:g} of {images} training images leaves nothing to train "
                           "on; lower validation_split or give validation_dir")
    return n


def scan_validation_dir(values: Mapping[str, Any]) -> list[ImageItem]:
    """The images of `validation_dir` (none without it), each counted once."""
    if values["validation_dir"] is None:
        return []
    items = scan_dataset(values["validation_dir"], None, values["caption_extension"], key="validation_dir").items
    for item in items:
        item.repeats = 1
    return items


def check_validation(values: Mapping[str, Any], images: int) -> None:
    """The pre-flight's part: the split leaves training images, the folder has readable images."""
    held_out_count(values["validation_split"], images)
    scan_validation_dir(values)


def split_validation(cfg, items: list[ImageItem], reporter) -> tuple[list[ImageItem], list[ImageItem]]:
    """(the images to train on, the held-out ones): a seeded split of `items`, or `validation_dir`."""
    held = scan_validation_dir({"validation_dir": cfg.validation_dir, "caption_extension": cfg.caption_extension})
    source = f"from {cfg.validation_dir}"
    n = held_out_count(cfg.validation_split, len(items))
    if n:
        order = list(range(len(items)))
        random.Random(f"validation-{validation_seed(cfg)}").shuffle(order)
        chosen = set(order[:n])
        held = [item for i, item in enumerate(items) if i in chosen]
        items = [item for i, item in enumerate(items) if i not in chosen]
        for item in held:
            item.repeats = 1
        source = f"held out of train_data_dir (validation_split {cfg.validation_split:g})"
    if held:
        reporter.log(f"Validation: {len(held)} images {source}, each scored at {cfg.validation_timesteps} fixed "
                     "timesteps at every checkpoint and at the end")
    return items, held


def validation_metadata(cfg, data) -> dict[str, str]:
    """kohya's header keys for the validation set."""
    return {"ss_num_validation_images": str(len(data.items) if data is not None else 0),
            "ss_validation_seed": str(validation_seed(cfg)), "ss_validation_split": str(cfg.validation_split)}
