"""Run one training job on the daemon from inside a ComfyUI node: start the daemon if needed, submit,
mirror its events, and turn ComfyUI's cancel into a daemon cancel.

Cancel, not stop: pressing cancel in ComfyUI abandons the prompt, so nothing downstream would use a
partly trained LoRA, and a file that lands in the loras folder under a name no cache entry knows would
only clutter the LoRA list. The daemon kills the job's process (freeing its GPU memory at once) and
writes nothing. To keep a half-trained LoRA, stop the job from the command line instead
(`python -m daemon stop JOB`; the job id is on the node's `job_id` output and in the status node).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import host, thin

DaemonClient, DaemonError, DaemonUnavailable = thin.client.DaemonClient, thin.client.DaemonError, thin.client.DaemonUnavailable
TERMINAL_EVENTS, default_state_dir = thin.client.TERMINAL_EVENTS, thin.client.default_state_dir
ensure_daemon, recorded_python = thin.launcher.ensure_daemon, thin.launcher.recorded_python

# How often a quiet wait (model loading, a job queued behind another) looks at ComfyUI's cancel flag.
POLL_S = 0.5
# How long a lost connection may take to come back before the node gives up (the job keeps running).
RECONNECT_S = 60.0
# How long a cancelled node waits for the daemon to confirm that the job's process is gone.
CANCEL_WAIT_S = 15.0


class TrainingFailed(Exception):
    """The daemon refused or failed the job; the message is the daemon's one line."""

    # ComfyUI shows the exception's type beside its message; the pack's module name is a file path
    __module__ = "lora_daemon"


def daemon_python(state_dir: Path) -> str | None:
    """The daemon environment's Python: $LORA_DAEMON_PYTHON, the one install.py recorded, or the repo's
    own `.venv` (what `python install.py` creates next to this folder)."""
    if os.environ.get("LORA_DAEMON_PYTHON") or recorded_python(state_dir):
        return None  # ensure_daemon finds these itself
    venv = thin.REPO_ROOT / ".venv"
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return str(python) if python.exists() else None


def connect(state_dir: Path | None = None) -> DaemonClient:
    try:
        import websockets  # noqa: F401 - the client's one dependency, not one of ComfyUI's
    except ImportError:
        raise TrainingFailed("lora-daemon nodes need the websockets package in ComfyUI's Python: "
                             f"pip install -r {Path(__file__).resolve().parent / 'requirements.txt'}") from None
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    try:
        ensure_daemon(state_dir, python=daemon_python(state_dir))
        return DaemonClient.connect(state_dir)
    except DaemonUnavailable as exc:
        raise TrainingFailed(f"lora-daemon: {exc}") from None


def _next_event(client: DaemonClient, job_id: str, last: int) -> dict | None:
    """The job's next event, or None after POLL_S of quiet. A dropped connection is reopened and the
    subscription resumed after `last`, so no event is missed or seen twice."""
    try:
        for event in client.events(timeout=POLL_S):
            if event.get("job") == job_id and event["seq"] > last:
                return event
    except TimeoutError:
        return None
    except DaemonUnavailable:
        client.close()
        deadline = time.monotonic() + RECONNECT_S
        while True:
            host.raise_if_interrupted()
            try:
                client.open()
                client.subscribe(job_id, after=last)
                return None
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise TrainingFailed(f"lora-daemon: lost the connection to the daemon while job {job_id} "
                                         "ran; it may still be training (see `python -m daemon jobs`)") from None
                time.sleep(POLL_S)
    return None


def cancel_quietly(client: DaemonClient, job_id: str, wait: float = CANCEL_WAIT_S) -> None:
    """Cancel and wait (briefly) until the daemon says the job is over, so its GPU memory is free before
    ComfyUI runs the next prompt. Best effort: the node is already failing or interrupted, and that
    is what the user sees."""
    with contextlib.suppress(DaemonError, OSError, TimeoutError):
        client.close()  # the old connection may be mid-failure; a fresh one is cheap
        client.open()
        job = client.cancel(job_id)
        deadline = time.monotonic() + wait
        while job["state"] not in ("finished", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(job_id)


def run_job(
    client: DaemonClient,
    config: dict,
    *,
    base_dir: Path,
    deploy_dirs: list[Path],
    on_submitted: Callable[[dict], None],
    on_event: Callable[[dict], None],
    kind: str = "train",
    source: str = "ComfyUI Train LoRA node",
) -> dict:
    """Submit, follow to the end and return the `finished` event's data. Any exception raised while
    waiting (ComfyUI's InterruptProcessingException from a progress update included) cancels the job
    first and then propagates."""
    try:
        job = client.submit(config, base_dir=str(base_dir), source=source,
                            deploy_dirs=[str(d) for d in deploy_dirs], kind=kind)
    except DaemonError as exc:
        raise TrainingFailed(str(exc)) from None
    job_id = job["id"]
    on_submitted(job)
    last = 0
    try:
        client.subscribe(job_id)
        while True:
            event = _next_event(client, job_id, last)
            host.raise_if_interrupted()
            if event is None:
                continue
            last = event["seq"]
            on_event(event)
            if event["kind"] in TERMINAL_EVENTS:
                break
    except BaseException:
        cancel_quietly(client, job_id)
        raise
    data = event.get("data") or {}
    if event["kind"] == "failed":
        raise TrainingFailed(data.get("error") or f"job {job_id} failed (see `python -m daemon logs {job_id}`)")
    if event["kind"] == "cancelled":
        raise TrainingFailed(f"job {job_id} was cancelled ({data.get('reason', 'by a client')})")
    return {"job": job_id, **data}
