"""Scores of an image adapter, from its pictures and the base model's at the same prompts and seeds.

- **effect**: how far the adapter at weight 1 moves each picture from the base's at the same prompt
  and seed, relative to how far the base's pictures at two seeds lie apart. 0 is no change at all;
  around 1 the adapter changes a picture as much as a new seed does. Relative, so it reads the same
  at any resolution and for any model family.
- **collapse**: how far apart the adapter's pictures for different prompts (at one seed) lie,
  relative to how far apart the base's lie. Near 1 the prompts matter as much as before; near 0
  every prompt gives the same picture (an adapter overtrained on one image paints that image
  whatever it is asked).

Distances are the root mean square of the pixel differences after an area-averaging downscale to
at most `SIDE` pixels a side: what changes the composition and colours counts, single-pixel noise
hardly does, and a 1024 px picture costs no more to compare than a 64 px one.
"""

from __future__ import annotations

from itertools import combinations

SIDE = 64


def pixels(image, side: int = SIDE):
    """An image as float32 RGB in [0, 1], area-averaged down to at most `side` pixels a side."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    scale = side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def distance(a, b) -> float:
    """RMS difference of two images (PIL images or `pixels` arrays of the same shape)."""
    import numpy as np

    a = a if isinstance(a, np.ndarray) else pixels(a)
    b = b if isinstance(b, np.ndarray) else pixels(b)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def effect_score(adapter: list, base: list, base_other_seed: list) -> float:
    """Mean distance adapter-vs-base (same prompt and seed) over the mean distance between the
    base's pictures at two seeds. Each argument: one picture per prompt, in the same order."""
    moved = _mean([distance(a, b) for a, b in zip(adapter, base, strict=True)])
    spread = _mean([distance(b, c) for b, c in zip(base, base_other_seed, strict=True)])
    return moved / max(spread, 1e-6)


def prompt_spread(images: list) -> float:
    """Mean distance between the pictures of different prompts."""
    return _mean([distance(a, b) for a, b in combinations(images, 2)])


def collapse_score(adapter: list, base: list) -> float | None:
    """The adapter's prompt spread over the base's (the same prompts, one seed); None with fewer than two
    prompts or a base whose pictures do not depend on the prompt at all."""
    if len(adapter) < 2:
        return None
    base_spread = prompt_spread(base)
    if base_spread < 1e-4:
        return None
    return prompt_spread(adapter) / base_spread


def grid(rows: list[list], columns: list[str], cell: int = 256):
    """A PIL grid of pictures: one row per prompt (numbered at the left, as the report lists the prompts),
    one column per label, each picture scaled to fit `cell` pixels."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    scale = min(1.0, cell / max(w, h))
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    top, left = 16, 18
    out = Image.new("RGB", (left + w * len(columns), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(columns):
        draw.text((left + c * w + 3, 2), label, fill="black")
    for r, row in enumerate(rows):
        draw.text((4, top + r * h + h // 2 - 5), str(r + 1), fill="black")
        for c, picture in enumerate(row):
            out.paste(picture.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (left + c * w, top + r * h))
    return out
