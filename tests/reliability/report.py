"""Render tests/reliability/last_run.json as the figures tables of docs/reliability.md.

    RELIABILITY_RECORD=1 python -m pytest tests/reliability   # run the suite, keep its figures
    python tests/reliability/report.py --write                 # put them into docs/reliability.md

Without --write the Markdown is printed. The doc's figures sit between two marker comments; the
prose around them is left alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent.parent / "docs" / "reliability.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"


def _mib(kib) -> str:
    return f"{kib / 1024:.1f} MiB" if isinstance(kib, (int, float)) else "-"


def render(run: dict) -> str:
    s = run["sections"]
    crash, worker, fuzz = s.get("crash", {}), s.get("worker_faults", {}), s.get("fuzz", {})
    load, bad, hostile = s.get("load", {}), s.get("bad_inputs", {}), s.get("hostile", {})
    injected = crash.get("faults_injected", 0) + worker.get("faults_injected", 0)
    survived = crash.get("survived", 0) + worker.get("survived", 0)
    partial = crash.get("partial_files_seen", 0) + worker.get("partial_files_seen", 0)
    out = [
        f"Last run: {run['run_at']} on {run['machine']}; the whole suite took {run['duration_s']:.0f} s "
        f"(pytest exit status {run['exit_status']}).",
        "",
        "| faults injected | survived | jobs lost | partial files seen | bad inputs tried | refused cleanly "
        "| fuzz messages | daemon RSS before / after fuzzing |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {injected} | {survived} | {crash.get('jobs_lost', '-')} | {partial} | {bad.get('tried', '-')} "
        f"| {bad.get('refused_cleanly', '-')} | {fuzz.get('messages', '-')} "
        f"| {_mib(fuzz.get('rss_before_kib'))} / {_mib(fuzz.get('rss_after_kib'))} |",
        "",
        "| part | figures |",
        "| --- | --- |",
    ]
    if crash:
        moments = ", ".join(f"{k} {v}" for k, v in sorted(crash["by_moment"].items()))
        out.append(
            f"| Crash recovery (SIGKILL of the daemon, restart) | {crash['faults_injected']} kills ({moments}; "
            f"seed {crash['seed']}); {crash['jobs']} jobs: {crash['jobs_finished']} finished, "
            f"{crash['jobs_failed_with_reason']} failed with a reason, {crash['jobs_lost']} lost; "
            f"{crash['partial_files_seen']} partial files and {crash['visible_temporaries_seen']} visible "
            f"temporaries seen; {crash['hidden_temporaries_left_by_kills']} hidden temporaries left by kills, "
            f"{crash['temporaries_removed_at_restart']} removed at restart, {crash['hidden_temporaries_at_end']} "
            f"at the end; earlier checkpoint loadable after {crash['earlier_checkpoint_loadable']} kills "
            f"mid-save |")
    if worker:
        causes = ", ".join(f"{k} → `{v}`" for k, v in worker["causes"].items())
        out.append(
            f"| Worker faults | {worker['faults_injected']} injected, {worker['survived']} ended with a clear "
            f"cause ({causes}); daemon stayed up: {worker['daemon_stayed_up']}; next job: {worker['next_job']}; "
            f"partial files: {worker['partial_files_seen']} |")
    if fuzz:
        codes = ", ".join(f"{k} {v}" for k, v in fuzz["error_codes"].items())
        out.append(
            f"| Protocol fuzzing (hypothesis) | {fuzz['messages']} frames: {fuzz['structured_errors']} structured "
            f"errors ({codes}), {fuzz['valid_replies']} valid replies, {fuzz['clean_closes']} clean closes "
            f"(invalid UTF-8, oversize), {fuzz['bad_answers']} bad answers; RSS {_mib(fuzz['rss_before_kib'])} → "
            f"{_mib(fuzz['rss_after_kib'])}; daemon stayed up: {fuzz['daemon_stayed_up']} |")
    if load:
        out.append(
            f"| Load | {load['clients']} subscribed clients, {load['jobs']} queued dry-run jobs "
            f"({load['finished']} finished) in {load['wall_s']} s; {load['events_delivered']} events delivered, "
            f"{load['clients_with_missing_or_misordered_events']} missing or out of order; queue order kept: "
            f"{load['queue_order_kept']} |")
    if bad:
        out.append(
            f"| Bad inputs | {bad['tried']} tried ({bad['via_submit']} through submit, {bad['via_raw_frames']} as "
            f"raw frames, {bad['via_cli']} through `python -m daemon train`), {bad['refused_cleanly']} refused "
            f"with one line naming the key or file and nothing written |")
    if hostile:
        out.append(
            f"| Hostile clients | {hostile.get('handshakes_refused')} of {hostile.get('handshakes_tried')} hostile "
            f"handshakes refused; token file {hostile.get('token_file_mode')} (was 0o644), state folder "
            f"{hostile.get('state_dir_mode')}; default bind {hostile.get('default_bind')}, listening on "
            f"{', '.join(hostile.get('listening_on', []))}; {hostile.get('public_binds_refused')} public bind "
            f"addresses refused |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    run = json.loads((HERE / "last_run.json").read_text(encoding="utf-8"))
    text = render(run)
    if "--write" not in argv:
        print(text)
        return 0
    doc = DOC.read_text(encoding="utf-8")
    before, _, rest = doc.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(f"{before}{START}\n{text}{END}{after}", encoding="utf-8")
    print(f"wrote the figures into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
