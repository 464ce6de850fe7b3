"""report.html and report.json: one job's evidence, for people (HTML) and programs (JSON).

The HTML is self-contained: its pictures are PNG data URIs, its plots inline SVG (charts.py), its
style inline; it loads nothing, so it opens from a file, an e-mail or a browser without network.
Both files are published under names not taken yet (`report.html`, else `report_2.html`, ...), the
JSON beside the HTML with the same stem, each complete before it gets its name.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from shared.files import publish_new


def data_uri(path: str | Path) -> str:
    """A PNG file as a data URI ("" when it is gone)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return ""


def render_html(data: dict) -> str:
    """The report page for the data `report.json` holds."""
    import jinja2

    from shared.evaluation import charts

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    evaluations = data["evaluations"]
    return env.get_template("report.html.j2").render(
        **data,
        finished=time.strftime("%Y-%m-%d %H:%M", time.localtime(data["finished_at"])),
        loss_chart=charts.loss_chart(data["losses"], evaluations),
        score_chart=charts.score_chart(evaluations, data["thresholds"], data["kind"]),
        histogram_chart=charts.bar_chart(data["data"].get("histogram") or {}),
        grids={r["step"]: data_uri(r["grid"]) for r in evaluations if r.get("grid")},
    )


def write_report(folder: Path, data: dict) -> Path:
    """Publish `report.html` and `report.json` (or `report_N.*`) into `folder`; returns the HTML's path."""
    html = render_html(data)
    text = json.dumps(data, indent=2, default=str)
    return publish_new(Path(folder), "report", ".html",
                       lambda p, name: Path(p).write_text(html, encoding="utf-8"),
                       {".json": lambda p, name: Path(p).write_text(text, encoding="utf-8")})
