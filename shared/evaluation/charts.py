"""The report's plots as inline SVG: the loss curves, the scores per evaluation with their thresholds,
and the data set's size histogram.

Written by hand rather than with a plotting library: the report must open anywhere without files
beside it, these are three small line and bar charts, and the daemon's environment has no plotting
package to rely on (matplotlib would be a large dependency for them). Every label is escaped.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 640, 240
MARGIN = {"left": 58, "right": 16, "top": 28, "bottom": 34}
COLOURS = {"loss": "#9fc0e8", "smoothed": "#1f5fbf", "eval_loss": "#e07b00", "effect": "#1f5fbf",
           "collapse": "#b0306a", "changed": "#1f5fbf", "unstopped": "#e07b00", "repeats": "#b0306a",
           "identical": "#2e8b57"}


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), debiased so the start is not pulled to 0."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """About `count` round numbers spanning [lo, hi]."""
    if hi - lo <= 0:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:.4g}"


def line_chart(series: list[dict], *, title: str, lines: list[tuple[str, float]] = (), y_min: float | None = None,
               width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG chart of `series` (each: `label`, `points` [(x, y)], optional `colour`, `width`, `markers`)
    with dashed horizontal `lines` (label, y), e.g. thresholds. "" when there is nothing to draw."""
    points = [p for s in series for p in s["points"]]
    if not points:
        return ""
    xs = [x for x, _ in points]
    ys = [y for _, y in points] + [y for _, y in lines]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys) if y_min is None else min(y_min, *ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.06
    y0, y1 = (y0 if y_min is not None and y0 == y_min else y0 - pad), y1 + pad
    left, right, top, bottom = MARGIN["left"], width - MARGIN["right"], MARGIN["top"], height - MARGIN["bottom"]

    def X(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def Y(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="16" class="title">{escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" class="axis"/>']
    for tick in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{Y(tick):.1f}" x2="{right}" y2="{Y(tick):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{Y(tick) + 4:.1f}" class="tick" text-anchor="end">{_number(tick)}</text>')
    for tick in nice_ticks(x0, x1, 5):
        if float(tick).is_integer() or x1 - x0 < 5:
            out.append(f'<text x="{X(tick):.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">'
                       f'{_number(tick)}</text>')
    out.append(f'<text x="{right}" y="{height - 4}" class="tick" text-anchor="end">step</text>')
    for label, y in lines:
        out.append(f'<line x1="{left}" y1="{Y(y):.1f}" x2="{right}" y2="{Y(y):.1f}" class="threshold"/>'
                   f'<text x="{right - 2}" y="{Y(y) - 4:.1f}" class="tick" text-anchor="end">{escape(label)}</text>')
    legend_x = left + 8
    for s in series:
        colour = s.get("colour", "#333")
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s["points"])
        if len(s["points"]) > 1:
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                       f'stroke-width="{s.get("width", 2)}"/>')
        if s.get("markers") or len(s["points"]) == 1:
            out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in s["points"]]
        out.append(f'<rect x="{legend_x}" y="{top - 2}" width="10" height="4" fill="{colour}"/>'
                   f'<text x="{legend_x + 14}" y="{top + 3}" class="legend">{escape(s["label"])}</text>')
        legend_x += 24 + 7 * len(s["label"])
    out.append("</svg>")
    return "".join(out)


def loss_chart(losses: list[float], evaluations: list[dict]) -> str:
    """Training loss per step (raw and smoothed) and the eval loss at each evaluation that had one."""
    series = []
    if losses:
        steps = range(1, len(losses) + 1)
        series += [{"label": "training loss", "points": list(zip(steps, losses)), "colour": COLOURS["loss"],
                    "width": 1},
                   {"label": "smoothed", "points": list(zip(steps, smooth(losses))), "colour": COLOURS["smoothed"]}]
    held_out = [(r["step"], r["metrics"]["eval_loss"]) for r in evaluations if "eval_loss" in r.get("metrics", {})]
    if held_out:
        series.append({"label": "eval loss", "points": held_out, "colour": COLOURS["eval_loss"], "markers": True})
    return line_chart(series, title="Loss")


def score_chart(evaluations: list[dict], thresholds: dict, kind: str | None) -> str:
    """The evaluation's scores per step, with the thresholds of the verdicts they feed."""
    names = ["effect", "collapse"] if kind == "image" else ["changed", "unstopped", "repeats", "identical"]
    series = []
    for name in names:
        points = [(r["step"], r["scores"][name]) for r in evaluations
                  if isinstance(r.get("scores", {}).get(name), (int, float))]
        if points:
            series.append({"label": name, "points": points, "colour": COLOURS[name], "markers": True})
    lines = [("no visible effect below", thresholds["verdict_min_effect"])]
    if kind == "image":
        lines.append(("collapse below", thresholds["verdict_collapse"]))
    else:
        lines += [("never stops above", thresholds["verdict_never_stops"]),
                  ("repeats above", thresholds["verdict_repeats"])]
    return line_chart(series, title="Scores per evaluation", lines=lines, y_min=0.0)


def bar_chart(counts: dict[str, int], *, title: str = "Training items per size bucket", width: int = WIDTH,
              height: int = 200) -> str:
    """Bars with their labels under them and their counts on top; "" without data."""
    if not counts:
        return ""
    left, right, top, bottom = MARGIN["left"], width - MARGIN["right"], MARGIN["top"], height - MARGIN["bottom"]
    most = max(counts.values()) or 1
    slot = (right - left) / len(counts)
    bar = max(2.0, slot * 0.7)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="16" class="title">{escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>']
    for i, (label, n) in enumerate(counts.items()):
        x = left + i * slot + (slot - bar) / 2
        h = (bottom - top) * n / most
        out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bar:.1f}" height="{h:.1f}" class="bar"/>'
                   f'<text x="{x + bar / 2:.1f}" y="{bottom - h - 4:.1f}" class="tick" text-anchor="middle">{n}</text>'
                   f'<text x="{x + bar / 2:.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">'
                   f'{escape(str(label))}</text>')
    out.append("</svg>")
    return "".join(out)
