"""The loss curve as a small PIL image (no matplotlib in a WebUI's Python to rely on)."""

from __future__ import annotations

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
AXES = (120, 120, 120)
RAW = (170, 200, 235)
SMOOTH = (30, 100, 200)
TEXT = (40, 40, 40)


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, the same smoothing TensorBoard's slider applies."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def loss_curve(points: list[tuple[int, float]], width: int = 480, height: int = 220) -> Image.Image | None:
    """Raw loss (light) and its moving average (dark) against the step; None before two points."""
    if len(points) < 2:
        return None
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    left, right, top, bottom = 56, 12, 26, 28
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = steps[0], steps[-1] if steps[-1] != steps[0] else steps[0] + 1

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=AXES)
    # at most ~2 points per pixel column: a long run stays cheap to draw
    stride = max(1, len(points) // (2 * (width - left - right)))
    draw.line([xy(s, v) for s, v in zip(steps[::stride], losses[::stride])], fill=RAW, width=1)
    draw.line([xy(s, v) for s, v in zip(steps[::stride], smooth(losses)[::stride])], fill=SMOOTH, width=2)
    draw.text((4, top - 2), f"{hi:.4g}", fill=TEXT)
    draw.text((4, height - bottom - 10), f"{lo:.4g}", fill=TEXT)
    draw.text((left, height - bottom + 6), f"step {x0}", fill=TEXT)
    label = f"step {steps[-1]}   loss {losses[-1]:.4f}"
    draw.text((width - right - 7 * len(label), height - bottom + 6), label, fill=TEXT)
    return image
