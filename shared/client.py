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
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .protocol import PROTOCOL_VERSION, SERVER_NAME, TERMINAL_EVENTS, TOKEN_HEADER

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "PROTOCOL_VERSION", "TERMINAL_EVENTS", "TOKEN_HEADER", "DaemonClient",
           "DaemonError", "DaemonUnavailable", "PortTaken", "default_state_dir", "endpoint_path", "eta_text",
           "format_duration", "read_endpoint", "read_token", "token_path"]

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


class PortTaken(DaemonUnavailable):
    """Something answers on the daemon's address, but it is not a lora-daemon: starting one there would
    fail too. The message names the port and how to move the daemon to another one."""

    def __init__(self, host: str, port: int, evidence: str, state_dir: Path | None = None):
        config = Path(state_dir) / "config.yaml" if state_dir else Path("<state folder>") / "config.yaml"
        other = free_port_near(host, port)
        super().__init__(
            f"port {port} on {host} is taken by another program, not a lora-daemon ({evidence}): stop that "
            f"program, or give the daemon another port: `port: {other}` in {config} (or `python -m daemon "
            f"serve --port {other}`); clients then find it through daemon.json")
        self.host, self.port = host, port


def free_port_near(host: str, port: int) -> int:
    """A port after `port` that nothing listens on now (a suggestion for the message above)."""
    for candidate in range(port + 1, min(port + 50, 65535)):
        with socket.socket() as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return port + 1


def who_answers(host: str, port: int, timeout: float = 3.0) -> str | None:
    """What answers a websocket handshake at host:port when it is not a lora-daemon (for PortTaken), or
    None: nothing listens, a lora-daemon answers, or nothing came back in time (a busy daemon, maybe)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    data = b""
    with sock:
        try:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: bG9yYS1kYWVtb24tcHJvYmU=\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            if not data:
                return None
        except OSError:
            return None
    if not data:
        return "it closed the connection without answering"
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return "it does not speak HTTP"
    server = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("server:")), "")
    if server.startswith(SERVER_NAME):
        return None
    status = lines[0].split(" ", 2)[1] if len(lines[0].split(" ")) > 1 else "?"
    return f"it answered HTTP {status}" + (f" as {server}" if server else "")


def _alive(pid) -> bool:
    if not isinstance(pid, int) or os.name != "posix":  # os.kill(pid, 0) would end a process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_CONFIG_LINE = re.compile(r"^(host|port):\s*['\"]?([^'\"#\s]+)['\"]?\s*(#.*)?$")


def configured_endpoint(state_dir: Path) -> tuple[str | None, int | None]:
    """`host:` and `port:` from the daemon's config.yaml (top-level lines; no YAML parser needed here)."""
    found: dict[str, str] = {}
    try:
        lines = (Path(state_dir) / "config.yaml").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, None
    for line in lines:
        match = _CONFIG_LINE.match(line)
        if match:
            found[match[1]] = match[2]
    port = found.get("port")
    return found.get("host"), int(port) if port and port.isdigit() and int(port) > 0 else None


def read_endpoint(state_dir: Path) -> tuple[str, int]:
    """Where this state folder's daemon listens: `daemon.json` of a daemon still running, else what its
    config.yaml asks for (a port moved there takes effect at the next start), else the defaults."""
    try:
        data = json.loads(endpoint_path(state_dir).read_text(encoding="utf-8"))
        recorded = (str(data["host"]), int(data["port"]))
        pid = data.get("pid")
    except (OSError, ValueError, KeyError, TypeError):
        recorded, pid = None, None
    if recorded and _alive(pid):
        return recorded
    fallback_host, fallback_port = recorded or (DEFAULT_HOST, DEFAULT_PORT)
    host, port = configured_endpoint(state_dir)
    return host or fallback_host, port or fallback_port


class _RedactToken(logging.Filter):
    """websockets logs every handshake header at DEBUG (a WebUI started with `--loglevel DEBUG` writes
    them into its log): the token header's value, and any token this process used, become <redacted>."""

    secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2 and isinstance(args[0], str) and args[0].lower() == TOKEN_HEADER.lower():
            args = (args[0], "<redacted>")
        if self.secrets:
            args = tuple(self._scrub(a) if isinstance(a, str) else a for a in args)
            if isinstance(record.msg, str):
                record.msg = self._scrub(record.msg)
        if isinstance(record.args, tuple):
            record.args = args
        return True

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return text


def websockets_logger(side: str, token: str | None = None) -> logging.Logger:
    """The logger to hand websockets (`side`: client or server): websockets' own hierarchy, so levels
    set for "websockets" still apply, with the token redacted from every record."""
    logger = logging.getLogger(f"websockets.{side}.lora_daemon")
    if not any(isinstance(f, _RedactToken) for f in logger.filters):
        logger.addFilter(_RedactToken())
    if token:
        _RedactToken.secrets.add(token)
    return logger


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

    def __init__(self, url: str, token: str, timeout: float = 30.0, origin: str | None = None,
                 state_dir: Path | None = None):
        self.url = url
        self.state_dir = state_dir  # named in messages (where the port is set)
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
        url = f"ws://{host or known_host}:{port or known_port}"
        if token is None:
            try:
                token = read_token(state)
            except DaemonUnavailable:  # no daemon ever ran here; still say so if a stranger holds the port
                cls(url, "", min(timeout, 5.0), state_dir=state).probe()
                raise
        client = cls(url, token, timeout, state_dir=state)
        client.open()
        return client

    def probe(self) -> None:
        """Raise PortTaken if another program answers at this address; anything else is left to the
        caller (a lora-daemon refusing this token, or nothing listening)."""
        try:
            self.open()
        except PortTaken:
            raise
        except DaemonUnavailable:
            return
        self.close()

    def open(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        headers = {TOKEN_HEADER: self.token}
        host, _, port = self.url.removeprefix("ws://").rpartition(":")
        host, port = host.strip("[]"), int(port)
        try:
            self._ws = connect(self.url, additional_headers=headers, origin=self.origin,
                               open_timeout=self.timeout, max_size=16 * 2**20,
                               logger=websockets_logger("client", self.token))
        except InvalidStatus as exc:
            server = exc.response.headers.get("Server", "")
            if not server.startswith(SERVER_NAME):  # an HTTP server of another program on our port
                what = f"it answered HTTP {exc.response.status_code}" + (f" as {server}" if server else "")
                raise PortTaken(host, port, what, self.state_dir) from None
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            raise DaemonUnavailable(f"{self.url}: the daemon refused the connection: "
                                    f"{exc.response.status_code} {body}") from None
        # ConnectionClosed: a daemon that is going down or coming up may reset the handshake midway
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            stranger = who_answers(host, port)  # websockets versions report a stranger differently
            if stranger:
                raise PortTaken(host, port, stranger, self.state_dir) from None
            raise DaemonUnavailable(f"{self.url}: no daemon answered ({exc}); "
                                    "start it with `python -m daemon serve`") from None
        server = self._ws.response.headers.get("Server", "")
        if not server.startswith(SERVER_NAME):  # another program's websocket server
            self.close()
            raise PortTaken(host, port, f"a websocket server that calls itself {server or 'nothing'}", self.state_dir)
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

    def deploy(self, job_id: str, checkpoint: int | None = None) -> dict:
        """Publish a saved checkpoint of a finished job (default: the best one its evaluation named) into
        the job's deploy folders; the reply names the `step` and the `paths` written."""
        fields: dict[str, Any] = {"job": job_id}
        if checkpoint is not None:
            fields["checkpoint"] = checkpoint
        return self.request("deploy", **fields)

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


def format_duration(seconds: float | None) -> str:
    """`1:02:05` or `4:07` (`?` for no number)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(it_s: float | None, eta_s: float | None) -> str:
    """`ETA 4:07`, or `ETA estimating...` while the trainer has no rate yet (the first step): what the
    CLI, the WebUI tab and the ComfyUI node show."""
    return f"ETA {format_duration(eta_s)}" if it_s and eta_s is not None else "ETA estimating..."
