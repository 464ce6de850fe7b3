"""Drive the Train LoRA tab in a real headless Chromium (run with the gradio 3 test environment's Python).

    python drive_tab.py --url URL --out DIR --dataset DIR --output-name NAME --advanced YAML [--rank N ...]

Prints one JSON object with what a person would have seen; the pytest side asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP = re.compile(r"step (\d+)/(\d+)")


def text_of(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def wait_text(page, selector: str, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = text_of(page, selector)
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{selector} never showed {needle!r} in {timeout:.0f} s; last: {text!r}")


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def fill_form(page, args, advanced: str) -> None:
    field(page, "lora_daemon_dataset").fill(args.dataset)
    field(page, "lora_daemon_output_name").fill(args.output_name)
    for elem_id, value in (("lora_daemon_rank", args.rank), ("lora_daemon_alpha", args.alpha),
                           ("lora_daemon_lr", args.learning_rate), ("lora_daemon_batch", args.batch_size),
                           ("lora_daemon_resolution", args.resolution)):
        field(page, elem_id).fill(value)
    if not field(page, "lora_daemon_advanced").is_visible():
        page.get_by_text("Advanced: every other config key").first.click()
    field(page, "lora_daemon_advanced").fill(advanced)


def lora_cards(page) -> list[str]:
    """The names on the Lora cards of the txt2img tab, as a person opening that tab sees them."""
    page.locator("#tabs button", has_text="txt2img").first.click()
    page.locator("#txt2img_extra_tabs button", has_text="Lora").first.click()
    names = page.locator("#txt2img_lora_cards .card").evaluate_all("els => els.map(e => e.dataset.name)")
    return sorted(names)


def wait_for_card(page, name: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    names: list[str] = []
    while time.monotonic() < deadline:
        names = lora_cards(page)
        if name in names:
            return names
        time.sleep(0.3)
    return names


def open_train_tab(page) -> None:
    page.locator("#tabs button", has_text="Train LoRA").first.click()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output-name", required=True)
    parser.add_argument("--advanced", default="")
    parser.add_argument("--rank", default="4")
    parser.add_argument("--alpha", default="4")
    parser.add_argument("--learning-rate", default="0.001")
    parser.add_argument("--batch-size", default="2")
    parser.add_argument("--resolution", default="64")
    parser.add_argument("--screenshot", action="append", default=[], help="where the mid-training shot goes")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--then", action="append", default=[], choices=["stop", "cancel"],
                        help="afterwards, train again with --long-advanced and press Stop / Cancel mid-way")
    parser.add_argument("--long-advanced", default="")
    parser.add_argument("--load-model-flag", default="",
                        help="create this file once the page is loaded: the WebUI then loads (hashes) the checkpoint")
    args = parser.parse_args()
    seen: dict = {"progress": [], "steps": []}

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(30_000)
        page.goto(args.url, wait_until="domcontentloaded")
        seen["cards_at_start"] = lora_cards(page)  # the page's first load renders (and caches) the cards
        open_train_tab(page)

        # no daemon yet: the tab says so and offers to start one
        seen["no_daemon"] = wait_text(page, "#lora_daemon_status", "No lora-daemon is running", 30)
        seen["start_visible"] = page.locator("#lora_daemon_start").is_visible()
        seen["base_model_default"] = field(page, "lora_daemon_base_model").input_value()
        if args.load_model_flag:  # the WebUI finishes loading the checkpoint now: it hashes and retitles it
            open(args.load_model_flag, "w").close()
            log = os.environ["FAKE_WEBUI_LOG"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and '"load_model"' not in open(log).read():
                time.sleep(0.1)
            seen["base_model_when_trained"] = field(page, "lora_daemon_base_model").input_value()
        page.locator("#lora_daemon_start").click()
        seen["daemon_up"] = wait_text(page, "#lora_daemon_status", "lora-daemon", 90)
        wait_text(page, "#lora_daemon_status", "Daemon running", 90)
        seen["daemon_up"] = text_of(page, "#lora_daemon_status")
        seen["start_visible_after"] = page.locator("#lora_daemon_start").is_visible()

        fill_form(page, args, args.advanced)
        page.locator("#lora_daemon_train").click()

        shot_taken = False
        deadline = time.monotonic() + 180
        result = ""
        while time.monotonic() < deadline:
            progress = text_of(page, "#lora_daemon_progress")
            if progress and (not seen["progress"] or seen["progress"][-1] != progress):
                seen["progress"].append(progress)
            match = STEP.search(progress)
            if match:
                step, total = int(match.group(1)), int(match.group(2))
                if not seen["steps"] or seen["steps"][-1] != step:
                    seen["steps"].append(step)
                if 0 < step < total and not shot_taken and "running" in progress:
                    page.wait_for_timeout(600)  # one more redraw, so the loss curve has a few points
                    for path in args.screenshot:
                        page.screenshot(path=path, full_page=True)
                    shot_taken = True
                    seen["shot_progress"] = text_of(page, "#lora_daemon_progress")
                    seen["loss_curve_shown"] = page.locator("#lora_daemon_loss img").count() > 0
            if match and 0 < int(match.group(1)) < int(match.group(2)) and "running" in progress:
                seen.setdefault("status_while_running", []).append(text_of(page, "#lora_daemon_status"))
            result = field(page, "lora_daemon_result").input_value()
            if result or "Failed:" in progress or "refused" in progress or "Check the form" in progress:
                break
            time.sleep(0.1)
        seen["result"] = result
        seen["final_progress"] = text_of(page, "#lora_daemon_progress")
        seen["queue"] = text_of(page, "#lora_daemon_queue")
        seen["evidence"] = text_of(page, "#lora_daemon_evidence")  # the evaluation: warnings, scores, report
        seen["report_offered"] = page.locator("#lora_daemon_report").is_visible()
        seen["job"] = field(page, "lora_daemon_job").input_value()
        seen["screenshot_taken"] = shot_taken
        page.screenshot(path=f"{args.out}/webui_tab_done.png", full_page=True)

        # Reload list: the title from before the hashing becomes the current one
        page.locator("#lora_daemon_refresh_checkpoints").click()
        page.wait_for_timeout(1000)
        seen["base_model_after_reload_list"] = field(page, "lora_daemon_base_model").input_value()

        # the new LoRA's card: in this open page, then in a freshly loaded one, without pressing refresh
        if seen["result"]:
            seen["cards_open_page"] = wait_for_card(page, "webui_test", 15)
            page.reload(wait_until="domcontentloaded")
            seen["cards_fresh_page"] = wait_for_card(page, "webui_test", 15)
            open_train_tab(page)
            wait_text(page, "#lora_daemon_status", "Daemon running", 30)
            seen["base_model_after_page_reload"] = field(page, "lora_daemon_base_model").input_value()

        for action in args.then:
            previous_job = field(page, "lora_daemon_job").input_value()
            fill_form(page, args, args.long_advanced)  # again: a page reload empties the form
            page.locator("#lora_daemon_train").click()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                match = STEP.search(text_of(page, "#lora_daemon_progress"))
                if field(page, "lora_daemon_job").input_value() != previous_job and match and int(match.group(1)) >= 2:
                    break
                time.sleep(0.1)
            if action == "stop":  # a page reload loses the live view; Refresh finds the running job again
                running_job = field(page, "lora_daemon_job").input_value()
                page.reload(wait_until="domcontentloaded")
                open_train_tab(page)
                wait_text(page, "#lora_daemon_status", "Daemon running", 30)
                seen["job_box_after_reload"] = field(page, "lora_daemon_job").input_value()
                page.locator("#lora_daemon_refresh").click()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and field(page, "lora_daemon_job").input_value() != running_job:
                    time.sleep(0.1)
                seen["reattached"] = {"job": field(page, "lora_daemon_job").input_value(), "running_job": running_job,
                                      "progress": wait_text(page, "#lora_daemon_progress", "running · step", 30)}
            page.locator(f"#lora_daemon_{action}").click()
            final = "finished" if action == "stop" else "cancelled"
            text = wait_text(page, "#lora_daemon_progress", f" · {final}", 120)
            time.sleep(0.5)
            seen[action] = {"progress": text, "result": field(page, "lora_daemon_result").input_value(),
                            "job": field(page, "lora_daemon_job").input_value(), "previous_job": previous_job}
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
