"""Start the daemon in the background when a client (WebUI tab, ComfyUI node) finds none running.

Standard library only: this runs inside a host's Python. The daemon runs in its own environment, so
the launcher needs that environment's Python: given explicitly, or `$LORA_DAEMON_PYTHON`, or the
`python` that install.py recorded in `<state>/install.json`. The daemon's output goes to
`<state>/daemon.log`, and every error says where that log is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .client import DaemonClient, DaemonUnavailable, PortTaken, default_state_dir, read_endpoint

INSTALL_RECORD = "install.json"


class LaunchError(DaemonUnavailable):
    """The daemon could not be started; the message says why and where its log is."""


def log_path(state_dir: Path) -> Path:
    return Path(state_dir) / "daemon.log"


def recorded_python(state_dir: Path) -> str | None:
    """The daemon environment's Python as install.py recorded it, if it still exists."""
    try:
        data = json.loads((Path(state_dir) / INSTALL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    python = data.get("python")
    return python if python and Path(python).exists() else None


def daemon_answers(state_dir: Path, timeout: float = 3.0) -> dict | None:
    """The daemon's `info` if one answers for this state folder, else None. Raises `PortTaken` when
    another program answers on the daemon's port: starting a daemon there would fail too."""
    try:
        with DaemonClient.connect(state_dir, timeout=timeout) as client:
            return client.info()
    except PortTaken:
        raise
    except DaemonUnavailable:
        return None
    except OSError:
        return None


def ensure_daemon(
    state_dir: str | Path | None = None,
    *,
    python: str | None = None,
    extra_args: list[str] | None = None,
    wait: float = 60.0,
) -> dict:
    """Return the running daemon's info, starting `python -m daemon serve` first if none answers."""
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    info = daemon_answers(state_dir)
    if info is not None:
        return info
    python = python or os.environ.get("LORA_DAEMON_PYTHON") or recorded_python(state_dir)
    log = log_path(state_dir)
    if not python:
        raise LaunchError(
            f"no lora-daemon is running and none can be started: run `python install.py` (it records the "
            f"daemon's environment in {state_dir / INSTALL_RECORD}) or set LORA_DAEMON_PYTHON"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    args = [python, "-m", "daemon", "serve", "--state-dir", str(state_dir), *(extra_args or [])]
    with open(log, "ab") as out:
        out.write(f"\n--- starting: {' '.join(args)}\n".encode())
        out.flush()
        kwargs = {"start_new_session": True} if os.name != "nt" else {"creationflags": 0x00000008}
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs,
        )
    # The daemon outlives this call (and may be stopped long before the host exits): one waiting
    # thread reaps it when it ends, so it never lingers as a zombie in the host's process table.
    threading.Thread(target=proc.wait, name=f"lora-daemon-reaper-{proc.pid}", daemon=True).start()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"the daemon exited at start (code {proc.returncode}); see its log: {log}")
        info = daemon_answers(state_dir, timeout=2.0)
        if info is not None:
            return info
        time.sleep(0.2)
    host, port = read_endpoint(state_dir)
    raise LaunchError(f"the daemon did not answer on {host}:{port} within {wait:.0f} s; see its log: {log}")


if __name__ == "__main__":  # pragma: no cover - manual use: python -m shared.launcher
    print(json.dumps(ensure_daemon(python=sys.executable), indent=2))
