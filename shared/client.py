"""Talk to a running lora-daemon: the small client the CLI, the WebUI tab and the ComfyUI node share.

Standard library plus `websockets` only, so a host's Python can import it without torch; it imports
the rest of the thin client relatively (the hosts load it under a private package name). The client
finds the daemon the way a local user would: the state folder (`$LORA_DAEMON_HOME`, else
`$XDG_STATE_HOME/lora-daemon`, else `~/.local/state/lora-daemon`) holds the token file and
`daemon.json` with the port the daemon listens on.

    with DaemonClient.connect() as client:
        job = client.submit({"base_model": ..., ...}, base_dir="/where/the/config/was")
        for event in client.follow(job["id"]):
            print(event["kind"], event["data"])

`follow` reconnects after a dropped connection (a daemon restart, say) and asks for the events after
the last sequence number it saw, so nothing is missed and nothing comes twice.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .protocol import PROTOCOL_VERSION, TERMINAL_EVENTS, TOKEN_HEADER

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "PROTOCOL_VERSION", "TERMINAL_EVENTS", "TOKEN_HEADER", "DaemonClient",
           "DaemonError", "DaemonUnavailable", "default_state_dir", "endpoint_path", "read_endpoint", "read_token",
           "token_path"]

DEFAULT_HOST = "127.0.0.1"
# 7860 is AUTOMATIC1111/Forge, 8188 ComfyUI: the daemon takes the next free-looking one after A1111.
DEFAULT_PORT = 7861


def default_state_dir() -> Path:
    """Where the daemon keeps its token, database and job folders (per user, XDG state home)."""
    if os.environ.get("LORA_DAEMON_HOME"):
        return Path(os.environ["LORA_DAEMON_HOME"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "lora-daemon"


def token_path(state_dir: Path) -> Path:
    return Path(state_dir) / "token"


def endpoint_path(state_dir: Path) -> Path:
    """`daemon.json`: host, port and pid of the daemon last started with this state folder."""
    return Path(state_dir) / "daemon.json"


class DaemonError(Exception):
    """The daemon refused a request. `code` is machine-readable, `str(err)` the one-line message."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


class DaemonUnavailable(DaemonError):
    """No daemon answered (not running, wrong port, or the handshake was refused)."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


def read_endpoint(state_dir: Path) -> tuple[str, int]:
    path = endpoint_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["host"]), int(data["port"])
    except (OSError, ValueError, KeyError):
        return DEFAULT_HOST, DEFAULT_PORT


def read_token(state_dir: Path) -> str:
    path = token_path(state_dir)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DaemonUnavailable(
            f"{path}: cannot read the daemon token ({exc.strerror}); start it with `python -m daemon serve`"
        ) from None


class DaemonClient:
    """One websocket connection to the daemon. Requests block until their reply arrives; events that
    arrive meanwhile are kept for `follow`/`events`."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, origin: str | None = None):
        self.url = url
        self.token = token
        self.timeout = timeout
        self.origin = origin
        self._ws = None
        self._ids = itertools.count(1)
        self._events: deque[dict] = deque()
        self.welcome: dict | None = None

    # --- connection -----------------------------------------------------------------------------

    @classmethod
    def connect(cls, state_dir: str | Path | None = None, *, host: str | None = None, port: int | None = None,
                token: str | None = None, timeout: float = 30.0) -> DaemonClient:
        state = Path(state_dir) if state_dir else default_state_dir()
        known_host, known_port = read_endpoint(state)
        client = cls(f"ws://{host or known_host}:{port or known_port}", token or read_token(state), timeout)
        client.open()
        return client

    def open(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        headers = {TOKEN_HEADER: self.token}
        try:
            self._ws = connect(self.url, additional_headers=headers, origin=self.origin,
                               open_timeout=self.timeout, max_size=16 * 2**20)
        except InvalidStatus as exc:
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            raise DaemonUnavailable(f"{self.url}: the daemon refused the connection: "
                                    f"{exc.response.status_code} {body}") from None
        # ConnectionClosed: a daemon that is going down or coming up may reset the handshake midway
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            raise DaemonUnavailable(f"{self.url}: no daemon answered ({exc}); "
                                    "start it with `python -m daemon serve`") from None
        self.welcome = self._recv(self.timeout)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recv(self, timeout: float | None) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            raw = self._ws.recv(timeout=timeout)
        except ConnectionClosed as exc:
            raise DaemonUnavailable(f"{self.url}: connection closed ({exc})") from None
        return json.loads(raw)

    # --- requests -------------------------------------------------------------------------------

    def send_raw(self, text: str) -> None:
        """Send a frame as is (tests use it to check how malformed input is answered)."""
        self._ws.send(text)

    def request(self, type_: str, **fields: Any) -> dict:
        from websockets.exceptions import ConnectionClosed

        request_id = f"r{next(self._ids)}"
        try:
            self._ws.send(json.dumps({"v": PROTOCOL_VERSION, "type": type_, "id": request_id, **fields}))
        except ConnectionClosed as exc:
            raise DaemonUnavailable(f"{self.url}: connection closed ({exc})") from None
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.url}: no reply to {type_!r} within {self.timeout:.0f} s")
            msg = self._recv(left)
            if msg.get("type") == "event":
                self._events.append(msg)
            elif msg.get("id") == request_id:
                if msg.get("type") == "error":
                    raise DaemonError(msg.get("code", "error"), msg.get("message", ""), msg.get("field"))
                return msg

    def info(self) -> dict:
        return self.request("info")

    def submit(self, config: dict, *, base_dir: str | Path | None = None, source: str | None = None,
               priority: int = 0, deploy_dirs: list[str] | None = None, kind: str = "train",
               dry_run: bool = False) -> dict:
        """Queue a job: a training config (kind "train") or auto-label options (kind "label").
        `dry_run` only validates the config and dataset in a worker and reports like a job."""
        fields: dict[str, Any] = {"config": config, "priority": priority}
        if dry_run:
            fields["dry_run"] = True
        if kind != "train":
            fields["kind"] = kind
        if base_dir is not None:
            fields["base_dir"] = str(base_dir)
        if source is not None:
            fields["source"] = source
        if deploy_dirs:
            fields["deploy_dirs"] = [str(d) for d in deploy_dirs]
        return self.request("submit", **fields)["job"]

    def jobs(self, states: list[str] | None = None, limit: int = 100) -> list[dict]:
        fields: dict[str, Any] = {"limit": limit}
        if states:
            fields["states"] = states
        return self.request("list", **fields)["jobs"]

    def get(self, job_id: str) -> dict:
        return self.request("get", job=job_id)["job"]

    def stop(self, job_id: str) -> dict:
        return self.request("stop", job=job_id)["job"]

    def cancel(self, job_id: str) -> dict:
        return self.request("cancel", job=job_id)["job"]

    def delete(self, job_id: str) -> None:
        self.request("delete", job=job_id)

    def logs(self, job_id: str, offset: int = 0, max_bytes: int = 1 << 20) -> dict:
        return self.request("logs", job=job_id, offset=offset, max_bytes=max_bytes)

    def subscribe(self, job_id: str, after: int = 0) -> dict:
        return self.request("subscribe", job=job_id, after=after)

    # --- events ---------------------------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Events of every subscription on this connection, as they come (heartbeats skipped)."""
        while True:
            while self._events:
                yield self._events.popleft()
            msg = self._recv(timeout)
            if msg.get("type") == "event":
                yield msg

    def follow(self, job_id: str, after: int = 0, *, reconnect_for: float = 60.0) -> Iterator[dict]:
        """Every event of a job after sequence number `after`, until it finishes, fails or is
        cancelled. A dropped connection is reopened (for up to `reconnect_for` seconds) and the
        subscription resumed after the last event seen."""
        last = after
        while True:
            try:
                if self._ws is None:
                    self.open()
                self.subscribe(job_id, after=last)
                for event in self.events():
                    if event.get("job") != job_id or event["seq"] <= last:
                        continue
                    last = event["seq"]
                    yield event
                    if event["kind"] in TERMINAL_EVENTS:
                        return
            except DaemonUnavailable:
                self.close()
                deadline = time.monotonic() + reconnect_for
                while True:
                    time.sleep(0.5)
                    try:
                        self.open()
                        break
                    except DaemonUnavailable:
                        if time.monotonic() > deadline:
                            raise
