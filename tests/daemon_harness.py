"""A real daemon for tests: `python -m daemon serve` as a subprocess on 127.0.0.1, a free port and a
temporary state folder, plus raw-handshake and event helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.client import DaemonClient, DaemonUnavailable

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (new) parent to reap it is gone for our purposes
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class DaemonProcess:
    def __init__(self, state_dir: Path, read_roots: list[Path], write_roots: list[Path], extra: list[str] = ()):
        self.state_dir = Path(state_dir)
        self.port = free_port()
        self.read_roots = read_roots
        self.write_roots = write_roots
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # extra environment for the next start (e.g. a fault to inject)
        self.output = self.state_dir.parent / f"{self.state_dir.name}-daemon.out"

    def start(self) -> DaemonProcess:
        args = [sys.executable, "-m", "daemon", "serve", "--state-dir", str(self.state_dir), "--port", str(self.port)]
        for root in self.read_roots:
            args += ["--allow-read", str(root)]
        for root in self.write_roots:
            args += ["--allow-write", str(root)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", **self.env}
        out = open(self.output, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([*args, *self.extra], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        out.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.output.read_text()}")
            try:
                self.client().close()
                return True
            except DaemonUnavailable:
                return False

        wait_until(ready, 30, "the daemon to accept connections", interval=0.1)
        return self

    def client(self, timeout: float = 30.0) -> DaemonClient:
        return DaemonClient.connect(self.state_dir, port=self.port, timeout=timeout)

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def raw_handshake(port: int, headers: dict[str, str]) -> tuple[int, str]:
    """Send a websocket upgrade request with exactly these extra headers; return (status, body)."""
    lines = ["GET / HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        with contextlib.suppress(socket.timeout):
            while b"\r\n\r\n" not in data or (not data.startswith(b"HTTP/1.1 101") and len(data) < 4096):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def collect(client: DaemonClient, job_id: str, after: int = 0, until=None) -> list[dict]:
    """Follow a job to its end (or until `until(event)` is true) and return the events seen."""
    seen = []
    for event in client.follow(job_id, after=after):
        seen.append(event)
        if until and until(event):
            break
    return seen
