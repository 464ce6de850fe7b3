"""Masked loss on SD images: where each image's mask comes from and how it weights the loss."""

from pathlib import Path

from .setting import SD_ONLY, Rule, Setting

SECTION = "Masked loss (SD)"
SETTINGS = (
    Setting("masked_loss", bool, False, "Weight the loss per pixel by each image's mask (white trains, black is "
            "ignored, grey between; read from the red channel): <image>.mask.png or <image>-masklabel.png beside "
            "it, a file of the same name in mask_dir, or its alpha channel with mask_from_alpha. Images without "
            "one train on every pixel.", tasks=SD_ONLY),
    Setting("mask_dir", Path, None, "A folder of masks named as their images (any image suffix), kohya's way.",
            tasks=SD_ONLY, optional=True, path="read", exists="dir"),
    Setting("mask_from_alpha", bool, False, "Use an image's alpha channel as its mask when it has no mask file.",
            tasks=SD_ONLY),
    Setting("unmasked_weight", float, 0.0, "The weight kept where a mask is black (0: ignored).", tasks=SD_ONLY,
            minimum=0, maximum=1),
    Setting("normalize_masked_area_loss", bool, False, "Divide each image's loss by its mask's mean weight, so a "
            "small masked area trains as strongly as a whole image.", tasks=SD_ONLY),
)


def _mask_options_need_masked_loss(v) -> str | None:
    if v["masked_loss"]:
        return None
    set_ = [k for k in ("mask_dir",) if v[k] is not None]
    set_ += [k for k in ("mask_from_alpha", "normalize_masked_area_loss") if v[k]]
    if v["unmasked_weight"]:
        set_.append("unmasked_weight")
    if set_:
        return f"{set_[0]} has no effect without masked_loss: true; turn masked_loss on or remove {set_[0]}"
    return None


RULES = (Rule(("mask_dir", "mask_from_alpha", "unmasked_weight", "normalize_masked_area_loss", "masked_loss"),
              _mask_options_need_masked_loss, tasks=SD_ONLY),)
