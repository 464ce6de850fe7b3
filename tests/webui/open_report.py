"""Open a job's report.html in a real headless Chromium, the way a person double-clicks it (a file:// URL,
no network), and say what it shows. Run with the gradio 3 test environment's Python (it has playwright).

    python open_report.py REPORT.html [--screenshot PNG] [--chromium /usr/bin/chromium]

Prints one JSON object: the title, the verdict texts, the charts drawn (each SVG's title and its
on-screen size), the pictures (each grid's decoded size and on-screen size) and any request the page
tried to make (there must be none: the report is self-contained).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from drive_tab import CHROMIUM_FLAGS
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    parser.add_argument("--screenshot")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    url = Path(args.report).resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(url, wait_until="load")
        seen = {
            "title": page.title(),
            "verdicts": [t.strip() for t in page.locator(".verdict, .ok").all_inner_texts()],
            "best": page.locator("#best").all_inner_texts(),
            "charts": page.eval_on_selector_all("svg.chart", """els => els.map(e => {
                const r = e.getBoundingClientRect(), t = e.querySelector('.title');
                return {title: t ? t.textContent : '', width: r.width, height: r.height,
                        lines: e.querySelectorAll('polyline, path').length,
                        bars: e.querySelectorAll('rect.bar').length};
            })"""),
            "grids": page.eval_on_selector_all("img.grid", """els => els.map(e => ({
                alt: e.alt, natural: [e.naturalWidth, e.naturalHeight], shown: [e.width, e.height],
                complete: e.complete}))"""),
            "requests": requests,
        }
        if args.screenshot:
            page.screenshot(path=args.screenshot, full_page=True)
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
