"""Clients start the daemon when none is running, once, and say where its log is when they cannot."""

import json
import os
import signal
import sys
from pathlib import Path

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


class _Stranger:
    """Another program's HTTP server on the daemon's port (a dev server, another tool)."""

    def __enter__(self):
        import http.server
        import threading

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("with_token", [False, True])
def test_another_program_on_the_port_is_named_and_no_daemon_is_started_there(tmp_path, monkeypatch, with_token):
    import subprocess

    from shared.client import PortTaken

    monkeypatch.delenv("LORA_DAEMON_PYTHON", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    if with_token:  # a daemon ran here before; the port has been taken since
        (state / "token").write_text("t0ken")
    with _Stranger() as stranger:
        (state / "config.yaml").write_text(f"port: {stranger.port}\n")
        with pytest.raises(PortTaken) as err:
            ensure_daemon(state, python=sys.executable, wait=30)
        message = str(err.value)
        assert f"port {stranger.port} on 127.0.0.1 is taken by another program, not a lora-daemon" in message
        assert "HTTP" in message and str(state / "config.yaml") in message and "--port" in message
        assert not log_path(state).exists()  # no daemon was started only to fail on the same port

        cli = subprocess.run([sys.executable, "-m", "daemon", "info", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        lines = cli.stderr.strip().splitlines()
        assert cli.returncode == 3 and len(lines) == 1, cli.stderr
        assert lines[0].startswith(f"error: port {stranger.port} on 127.0.0.1 is taken by another program"), lines
        assert "config.yaml" in lines[0] and "start it with" not in lines[0]

        # the advice works: another port in config.yaml, and the daemon starts there
        free = int(message.split("`port: ")[1].split("`")[0])
        (state / "config.yaml").write_text(f"port: {free}\n")
        info = ensure_daemon(state, python=sys.executable, wait=60)
        pid = json.loads((state / "daemon.json").read_text())["pid"]
        try:
            assert info["version"] and json.loads((state / "daemon.json").read_text())["port"] == free
        finally:
            os.kill(pid, signal.SIGTERM)


def test_a_daemon_the_launcher_started_is_reaped_when_it_exits(tmp_path, monkeypatch):
    """A host process (the WebUI, ComfyUI) that started the daemon must not keep it as a zombie."""
    import time

    monkeypatch.delenv("LORA_DAEMON_PYTHON", raising=False)
    state = tmp_path / "state"
    ensure_daemon(state, python=sys.executable, extra_args=["--port", "0"], wait=60)
    pid = json.loads((state / "daemon.json").read_text())["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # a zombie keeps its /proc entry
        time.sleep(0.1)
    state_line = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0] \
        if Path(f"/proc/{pid}").exists() else "gone"
    assert state_line == "gone", f"the daemon process is still there after it exited: {state_line.strip()}"
