"""Reading training images as every image viewer shows them: one list of accepted types, one opener.

The trainer (bucketing, pixels, latent caches) and the auto-labeller read images only through this
module, so a file is never trained differently from how it was captioned or previewed:

- EXIF orientation is applied: a phone photo stored sideways with an orientation tag is upright,
  and its size is the upright size (width and height swap for the 90-degree tags), read from the
  header without decoding the pixels.
- High bit depth is scaled to 8 bits, never clipped: Pillow opens a 16-bit greyscale PNG or TIFF as
  `I;16` (or `I`), and its own `convert("RGB")` clips every value above 255, which turns almost the
  whole image white.
- Transparency is composited on a white background (what an editor's "flatten" does with its
  default background colour), never just dropped: the colour under a fully transparent pixel is
  arbitrary (often black) and would otherwise be trained.
"""

from __future__ import annotations

from pathlib import Path

# Every caption source (metadata.csv, .txt files, N_name folders) and the auto-labeller accept these;
# a file of another image type is skipped by name, never silently. GIF and TIFF give their first frame.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Image types people put in data sets that are not trained (Pillow cannot read them here, or they are
# camera raw files): named as skipped rather than ignored like a notes file.
OTHER_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".psd", ".tga", ".ico", ".ppm", ".pgm", ".svg",
                        ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2")
BACKGROUND = (255, 255, 255)
# EXIF orientation values (tag 0x0112) that turn the stored image by 90 or 270 degrees
_SWAPS_SIDES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def is_image(path: Path) -> bool:
    """An image the trainer reads (by its suffix)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def looks_like_unaccepted_image(path: Path) -> bool:
    """An image file of a type the trainer does not read: worth naming when it is skipped."""
    return Path(path).suffix.lower() in OTHER_IMAGE_SUFFIXES


def not_accepted(path: Path) -> str:
    """Why a file is skipped, for a scan summary."""
    return f"{Path(path).suffix.lower() or 'no suffix'} is not an image type the trainer reads " \
           f"({', '.join(IMAGE_SUFFIXES)})"


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as a viewer shows the image, from the header only (no pixels decoded)."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG)
        except Exception:  # noqa: BLE001 - a broken EXIF block: show it as stored, as viewers do
            orientation = None
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def open_rgb(path: Path):
    """The image as an upright 8-bit RGB `PIL.Image` (see the module docstring for the rules)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img):
    """8-bit RGB from any Pillow mode: high bit depths scaled, transparency flattened on white."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        img = Image.fromarray(_to_8_bit(img), "L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _to_8_bit(img):
    """A single-channel image of 16-bit integers (`I;16*`, or `I` as Pillow gives 16-bit PNG/TIFF
    greyscale) or floats (`F`, taken as 0..1 when it stays in that range) as a uint8 array."""
    import numpy as np

    values = np.asarray(img)
    if img.mode == "F":
        values = values.astype(np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8)
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)
