"""Clients start the daemon when none is running, once, and say where its log is when they cannot."""

import json
import os
import signal
import sys

import pytest

from shared.launcher import LaunchError, ensure_daemon, log_path


def test_starts_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_DAEMON_PYTHON", raising=False)
    state = tmp_path / "state"
    info = ensure_daemon(state, python=sys.executable, extra_args=["--port", "0"], wait=60)
    pid = json.loads((state / "daemon.json").read_text())["pid"]
    try:
        assert info["version"]
        again = ensure_daemon(state, python=sys.executable, extra_args=["--port", "0"])
        assert json.loads((state / "daemon.json").read_text())["pid"] == pid  # no second daemon
        assert again["version"] == info["version"]
        assert log_path(state).is_file()
    finally:
        os.kill(pid, signal.SIGTERM)


def test_no_environment_recorded_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_DAEMON_PYTHON", raising=False)
    with pytest.raises(LaunchError, match="run `python install.py`"):
        ensure_daemon(tmp_path / "state")


def test_a_daemon_that_cannot_start_points_at_its_log(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_DAEMON_PYTHON", raising=False)
    with pytest.raises(LaunchError, match="see its log: .*daemon.log"):
        ensure_daemon(tmp_path / "state", python=sys.executable, extra_args=["--port", "not-a-port"], wait=30)
