#!/usr/bin/env python3
"""Set up lora-daemon's own environment (never a host's), then optionally run the demo or the tests.

    python3 install.py            create or update the daemon's virtual environment (./.venv)
    python3 install.py --demo     ... and train the bundled tiny SD model on the bundled images
    python3 install.py --test     ... with the test tools, and run the test suite
    python3 install.py --venv P   use P instead of ./.venv

Only the standard library is used here, so any Python 3.10+ can run it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAMP = ".lora-daemon-install"


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted_state(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return f"{digest} {extras} {ROOT}"


def ensure_venv(venv_dir: Path, dev: bool) -> Path:
    """Create the venv if needed and install the project into it unless it is already current."""
    python = venv_python(venv_dir)
    if not python.exists():
        print(f"Creating the daemon environment in {venv_dir} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
    extras = "[dev]" if dev else ""
    stamp = venv_dir / STAMP
    current = stamp.read_text().splitlines() if stamp.exists() else []
    wanted = _wanted_state(extras)
    if wanted in current or (not dev and any(line.endswith(f" {ROOT}") and "[dev]" in line for line in current)):
        return python
    print(f"Installing lora-daemon{extras} and its dependencies (torch, diffusers, ...) ...", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-q", "-e", f"{ROOT}{extras}"], check=True)
    stamp.write_text(wanted + "\n")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the daemon's environment (default ./.venv)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--demo", action="store_true", help="run the bundled demo afterwards")
    action.add_argument("--test", action="store_true", help="install the test tools and run the tests")
    args, rest = parser.parse_known_args(argv)

    python = ensure_venv(args.venv.resolve(), dev=args.test)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.demo:
        return subprocess.run([str(python), "-m", "daemon", "demo", *rest], cwd=ROOT, env=env).returncode
    if args.test:
        return subprocess.run([str(python), "-m", "pytest", *rest], cwd=ROOT, env=env).returncode
    print(f"lora-daemon is installed in {args.venv}. Run it with: {python} -m daemon --help")
    return 0


if __name__ == "__main__":
    sys.exit(main())
