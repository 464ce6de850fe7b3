"""`python -m daemon serve`: the websocket server in front of the job queue.

Security, as the careful local daemons do it: loopback bind, an exact Host allow-list (DNS rebinding
makes Host and Origin both read the attacker's name, which is how a Host-vs-Origin comparison fell in
ComfyUI and Ollama's CVE-2024-28224), an Origin allow-list (clients without Origin are fine; `null` and every other
origin are refused, since browsers apply no CORS to websockets), the per-install token in a header,
and size and connection limits. All checks run in the HTTP handshake, before any message is read.

This process never imports torch: jobs run in `daemon.worker` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from http import HTTPStatus
from pathlib import Path

from daemon import protocol
from daemon.jobs import JobManager
from daemon.protocol import ProtocolError
from daemon.settings import Settings
from daemon.store import Store
from daemon.token import ensure_token, token_matches
from shared import __version__
from shared.client import PROTOCOL_VERSION, TOKEN_HEADER, endpoint_path, token_path, websockets_logger
from shared.errors import UserError
from shared.files import atomic_write

MAX_PENDING_MESSAGES = 10_000  # a client this far behind is disconnected (it can resubscribe from its seq)


class Connection:
    """One client: everything sent to it goes through one queue, so replies and events keep their order."""

    def __init__(self, ws):
        self.ws = ws
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.subscriptions: dict[str, object] = {}

    def send(self, msg: dict) -> None:
        if self.outbox.qsize() > MAX_PENDING_MESSAGES:
            self.outbox.put_nowait(None)  # writer closes the connection
            return
        self.outbox.put_nowait(protocol.encode(msg))

    async def writer(self) -> None:
        while True:
            frame = await self.outbox.get()
            if frame is None:
                await self.ws.close(1008, "client too slow; resubscribe from your last seq")
                return
            await self.ws.send(frame)


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.token = ""
        self.store: Store | None = None
        self.jobs: JobManager | None = None
        self.port = settings.port
        self.active = 0
        self.started = time.monotonic()
        self._devices: tuple[float, list] = (0.0, [])

    # --- handshake checks -----------------------------------------------------------------------

    def check_request(self, connection, request):
        headers = request.headers
        hosts = headers.get_all("Host")
        if len(hosts) != 1 or hosts[0].lower() not in self.settings.host_allowlist(self.port):
            return connection.respond(HTTPStatus.FORBIDDEN, "Host not allowed\n")
        origins = headers.get_all("Origin")
        if len(origins) > 1 or (origins and origins[0] not in self.settings.allowed_origins):
            return connection.respond(HTTPStatus.FORBIDDEN, "Origin not allowed\n")
        tokens = headers.get_all(TOKEN_HEADER)
        if len(tokens) != 1 or not token_matches(tokens[0], self.token):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      f"missing or wrong {TOKEN_HEADER} header (the token is in "
                                      f"{token_path(self.settings.state_dir)})\n")
        if self.active >= self.settings.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    # --- one connection -------------------------------------------------------------------------

    async def handle(self, ws) -> None:
        self.active += 1
        conn = Connection(ws)
        writer = asyncio.create_task(conn.writer())
        heartbeat = asyncio.create_task(self._heartbeat(conn))
        conn.send({"type": "welcome", "protocol": PROTOCOL_VERSION, "version": __version__})
        try:
            async for frame in ws:
                await self._answer(conn, frame)
        except Exception:  # the connection dropped mid-frame; nothing to tell anyone
            pass
        finally:
            self.active -= 1
            for job_id, deliver in conn.subscriptions.items():
                self.jobs.unsubscribe(job_id, deliver)
            heartbeat.cancel()
            writer.cancel()

    async def _heartbeat(self, conn: Connection) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            conn.send({"type": "heartbeat", "time": time.time()})

    async def _answer(self, conn: Connection, frame) -> None:
        request_id = None
        try:
            msg = protocol.decode(frame)
            request_id = msg.get("id")
            reply = await self.dispatch(conn, msg)
        except ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = request_id
            conn.send(exc.to_message())
            return
        except Exception as exc:  # a bug: say so, log it, keep serving
            traceback.print_exc()
            conn.send(protocol.error_message("internal", f"internal error: {type(exc).__name__}: {exc}",
                                             request_id=request_id))
            return
        if reply is None:  # already answered (subscribe sends its reply before the backlog)
            return
        if request_id is not None:
            reply["id"] = request_id
        conn.send(reply)

    async def dispatch(self, conn: Connection, msg: dict) -> dict | None:
        kind = msg["type"]
        jobs = self.jobs
        if kind == "ping":
            return {"type": "pong"}
        if kind == "info":
            return await self.info()
        if kind == "submit":
            job = await jobs.submit(msg["config"], base_dir=msg.get("base_dir"), source=msg.get("source"),
                                    priority=msg.get("priority", 0), deploy_dirs=msg.get("deploy_dirs", []),
                                    kind=msg.get("kind", "train"), dry_run=msg.get("dry_run", False))
            return {"type": "submitted", "job": job}
        if kind == "list":
            return {"type": "jobs", "jobs": self.store.list(msg.get("states"), msg.get("limit", 100))}
        if kind == "get":
            return {"type": "job", "job": jobs.get(msg["job"])}
        if kind == "subscribe":
            job_id = msg["job"]
            jobs.get(job_id)
            old = conn.subscriptions.pop(job_id, None)
            if old:
                jobs.unsubscribe(job_id, old)

            def deliver(event: dict, conn=conn) -> None:
                conn.send({"type": "event", **event})

            # the reply goes out before the backlog, so the client knows where the stream starts
            conn.send({"type": "subscribed", "job": job_id, "last_seq": self.store.get(job_id)["last_seq"],
                       **({"id": msg["id"]} if "id" in msg else {})})
            conn.subscriptions[job_id] = deliver
            jobs.subscribe(job_id, msg.get("after", 0), deliver)
            return None
        if kind == "unsubscribe":
            deliver = conn.subscriptions.pop(msg["job"], None)
            if deliver:
                jobs.unsubscribe(msg["job"], deliver)
            return {"type": "unsubscribed", "job": msg["job"]}
        if kind == "stop":
            return {"type": "stopping", "job": jobs.stop(msg["job"])}
        if kind == "cancel":
            return {"type": "cancelled", "job": jobs.cancel(msg["job"])}
        if kind == "delete":
            jobs.delete(msg["job"])
            return {"type": "deleted", "job": msg["job"]}
        if kind == "deploy":
            return {"type": "deployed", **await jobs.deploy(msg["job"], msg.get("checkpoint"))}
        if kind == "logs":
            return {"type": "logs", **jobs.read_log(msg["job"], msg.get("offset", 0), msg.get("max_bytes", 1 << 20))}
        raise AssertionError(kind)  # protocol.validate lets only known types through

    async def info(self) -> dict:
        return {
            "type": "info",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "state_dir": str(self.settings.state_dir),
            "devices": await self.devices(),
            "queue": self.jobs.queue_summary(),
            "max_parallel_jobs": self.settings.max_parallel_jobs,
            "read_roots": [str(p) for p in self.settings.read_roots],
            "write_roots": [str(p) for p in self.settings.write_roots],
        }

    async def devices(self) -> list[dict]:
        """GPUs and free VRAM from nvidia-smi (importing torch here would cost ~1 GB and seconds)."""
        checked, cached = self._devices
        if time.monotonic() - checked < 5 and cached:
            return cached
        devices = [{"type": "cpu", "cores": os.cpu_count()}]
        if shutil.which("nvidia-smi"):
            try:
                out = await asyncio.to_thread(
                    subprocess.run,
                    ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                )
                for line in out.stdout.strip().splitlines():
                    index, name, total, free = (part.strip() for part in line.split(","))
                    devices.append({"type": "cuda", "index": int(index), "name": name,
                                    "memory_total_mb": int(total), "memory_free_mb": int(free)})
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        self._devices = (time.monotonic(), devices)
        return devices

    # --- start and stop -------------------------------------------------------------------------

    async def run(self, ready=None) -> None:
        import websockets
        from websockets.asyncio.server import serve

        settings = self.settings
        self.token = ensure_token(token_path(settings.state_dir))
        self.store = Store(settings.db_path)
        self.jobs = JobManager(settings, self.store)
        recovered = self.jobs.recover()
        try:
            server = await serve(
                self.handle, settings.host, settings.port,
                process_request=self.check_request,
                max_size=settings.max_message_bytes,
                max_queue=64,
                ping_interval=20, ping_timeout=20,
                server_header=f"lora-daemon/{__version__}",
                logger=websockets_logger("server", self.token),  # its DEBUG lines list the token header
            )
        except OSError as exc:
            raise UserError(
                f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); another program "
                f"(or daemon) uses that port: pick another with --port or `port:` in {settings.config_file}"
            ) from None
        self.port = server.sockets[0].getsockname()[1]
        endpoint = {"host": settings.host, "port": self.port, "pid": os.getpid(), "version": __version__,
                    "websockets": websockets.__version__}
        atomic_write(endpoint_path(settings.state_dir),
                     lambda p: Path(p).write_text(json.dumps(endpoint), encoding="utf-8"))
        self.jobs.start()
        print(f"lora-daemon {__version__} listening on ws://{settings.host}:{self.port} "
              f"(state: {settings.state_dir}, token: {token_path(settings.state_dir)})", flush=True)
        if recovered:
            print(f"re-queued {len(recovered)} job(s) interrupted by the last shutdown: {', '.join(recovered)}",
                  flush=True)
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        if ready:
            ready(self)
        try:
            await stop
        finally:
            print("lora-daemon shutting down; running jobs resume at the next start", flush=True)
            server.close()
            await self.jobs.shutdown()
            await server.wait_closed()
            self.store.close()


def lock_state_dir(state_dir: Path):
    """One daemon per state folder: two would run the same queued job twice."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = state_dir.stat().st_mode & 0o777
    if mode & 0o077 and os.name == "posix":  # job logs and configs name the user's files: theirs alone
        print(f"warning: {state_dir} was open to others (mode {mode:o}); set to 0700", file=sys.stderr)
        state_dir.chmod(0o700)
    lock = open(state_dir / "daemon.lock", "a+")  # noqa: SIM115 - held for the process's life
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; rely on the port being taken
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UserError(f"{state_dir}: another daemon already uses this state folder "
                        f"(pid {lock.read().strip() or '?'}); stop it first or pass --state-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def serve(settings: Settings) -> int:
    lock = lock_state_dir(settings.state_dir)
    try:
        asyncio.run(Daemon(settings).run())
    finally:
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(Settings()))
