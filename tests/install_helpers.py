"""install.py as the tests run it: against a stand-in of the daemon's environment, so nothing is ever
pip-installed into the shared development environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def install_module():
    """The checkout's install.py as a module (by its path: another `install` may be importable)."""
    spec = importlib.util.spec_from_file_location("lora_daemon_install", REPO / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    return install


def stand_in_venv(folder: Path, python_script: str | None = None) -> Path:
    """The daemon's environment for install.py: a `bin/python` that runs the tests' Python on this
    checkout (or `python_script`), stamped as current so install.py installs nothing (a real
    `pip install -e` here would repoint the shared development environment at whichever checkout ran
    the test)."""
    install = install_module()
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(python_script or f'#!/bin/sh\nPYTHONPATH="{REPO}" OMP_NUM_THREADS=1 exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / install.STAMP).write_text(install._wanted_state("[dev]") + "\n")
    return folder


def run_install(*args, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("LORA_DAEMON_HOME", None)
    env.pop("XDG_STATE_HOME", None)
    venv = home / "daemon-venv"
    if not venv.exists():
        stand_in_venv(venv)
    return subprocess.run([sys.executable, str(REPO / "install.py"), "--venv", str(venv), *args],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=600)


