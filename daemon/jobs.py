"""The job queue: accept jobs, run them one at a time in worker processes, number and fan out events.

Lives in the server process and runs on its event loop, so it must never import torch: each job's
training happens in `python -m daemon.worker`. A worker sends its events as JSON lines on its
stdout; the queue stores each in SQLite with the job's next sequence number (in the same
transaction as the job's new state) and then pushes it to every subscribed connection. Storing
before sending is what lets a client that reconnects ask for "everything after seq N".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from daemon.protocol import ProtocolError
from daemon.settings import Settings
from daemon.store import FINAL_STATES, Store
from daemon.worker import RESULT_FILE  # the worker module itself imports nothing heavy
from shared.roots import Roots, confine
from shared.schema import JOB_KINDS

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `daemon/` and `shared/`


def kill_worker(process) -> None:
    """Kill a worker and all it started (`accelerate launch` and its ranks for a multi-process job):
    the worker leads its own process group, so one signal reaches every process of the job."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


class Worker:
    def __init__(self, job_id: str, process: asyncio.subprocess.Process):
        self.job_id = job_id
        self.process = process
        self.result: dict | None = None
        self.error: dict | None = None
        self.cancelled = False
        self.done = asyncio.Event()


class JobManager:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.workers: dict[str, Worker] = {}
        # job id -> callbacks that deliver an event to one connection (called in seq order)
        self.subscribers: dict[str, set[Callable[[dict], None]]] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self.shutting_down = False

    # --- life cycle -----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Jobs left "running" by a daemon that died: note the interruption, re-queue (or fail) them."""
        recovered = []
        for job in self.store.list(["running"], limit=10_000):
            end_orphaned_worker(job)
            done = Path(job["job_dir"]) / RESULT_FILE
            if done.is_file():  # the worker finished; the daemon died before it heard the result
                result = json.loads(done.read_text(encoding="utf-8"))
                self.emit(job["id"], "finished", result, state="finished", result=result, pid=None,
                          finished_at=time.time())
                continue
            removed = remove_job_leftovers(job)
            self.emit(job["id"], "interrupted", {"reason": "the daemon stopped while the job ran",
                                                 "attempt": job["attempts"], "removed_temporaries": removed},
                      pid=None)
            if self.settings.resume_interrupted:
                self.emit(job["id"], "queued", {"priority": job["priority"], "resume": True}, state="queued")
            else:
                self.emit(job["id"], "failed", {"error": "interrupted: the daemon stopped while the job ran",
                                                "cause": "interrupted"},
                          state="failed", error="interrupted: the daemon stopped while the job ran",
                          error_cause="interrupted", finished_at=time.time())
            recovered.append(job["id"])
        return recovered

    def start(self) -> None:
        self._scheduler = asyncio.create_task(self._schedule(), name="scheduler")
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop the workers and leave their jobs "running": the next start re-queues them."""
        self.shutting_down = True
        if self._scheduler:
            self._scheduler.cancel()
        for worker in list(self.workers.values()):
            kill_worker(worker.process)
        for worker in list(self.workers.values()):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker.process.wait(), 10)

    # --- events ---------------------------------------------------------------------------------

    def emit(self, job_id: str, kind: str, data: dict, **job_updates: Any) -> dict:
        event = self.store.add_event(job_id, kind, data, **job_updates)
        for deliver in list(self.subscribers.get(job_id, ())):
            deliver(event)
        return event

    def subscribe(self, job_id: str, after: int, deliver: Callable[[dict], None]) -> int:
        """Deliver the stored events after `after`, then every new one. No await happens between
        reading the backlog and registering, so no event can slip between the two."""
        backlog = self.store.events(job_id, after)
        for event in backlog:
            deliver(event)
        self.subscribers.setdefault(job_id, set()).add(deliver)
        return backlog[-1]["seq"] if backlog else after

    def unsubscribe(self, job_id: str, deliver: Callable[[dict], None]) -> None:
        subs = self.subscribers.get(job_id)
        if subs:
            subs.discard(deliver)
            if not subs:
                del self.subscribers[job_id]

    # --- requests -------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job {job_id!r} (see `python -m daemon jobs`)", "job")
        return job

    async def submit(self, config: dict, *, base_dir: str | None, source: str | None, priority: int,
                     deploy_dirs: list[str], kind: str = "train", dry_run: bool = False) -> dict:
        source = source or "submit"
        if base_dir is not None and not Path(base_dir).is_absolute():
            raise ProtocolError("bad_message", f"submit: base_dir must be an absolute path, got {base_dir!r}",
                                "base_dir")
        if kind not in JOB_KINDS:
            raise ProtocolError("bad_message", f"submit: kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}",
                                "kind")
        if kind != "train" and dry_run:
            raise ProtocolError("bad_message", "submit: dry_run is for training configs (kind train)", "dry_run")
        if kind == "label":
            return await self._submit_label(config, base_dir=base_dir, source=source, priority=priority)
        if kind != "train":
            return await self._submit_tool(kind, config, base_dir=base_dir, source=source, priority=priority)
        for folder in deploy_dirs:
            if not Path(folder).is_absolute():
                raise ProtocolError("bad_message", f"deploy_dirs: {folder} must be an absolute path", "deploy_dirs")
        # The job's id and folder come first, so the config is checked with the output_dir it will use;
        # nothing is stored or created until the pre-flight has passed.
        job_id = self.store.new_job_id()
        job_dir = self.settings.jobs_dir / job_id
        config = dict(config)
        if config.get("output_dir") in (None, ""):  # keep the files in the job's own folder
            if not config.get("output_name"):
                raise ProtocolError("invalid_config", f"{source}: missing required key 'output_dir' (or give "
                                    "output_name and the daemon keeps the files in the job's folder)", "config")
            config["output_dir"] = str(job_dir / "output")
        checked = await asyncio.to_thread(self._preflight, config, source, base_dir, deploy_dirs)
        spec = {"source": source, "base_dir": base_dir, "config": checked.canonical,
                "deploy_dirs": [str(Path(d).resolve()) for d in deploy_dirs]}
        if dry_run:
            spec["dry_run"] = True
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "config.yaml").write_text(yaml.safe_dump(checked.canonical, sort_keys=False), encoding="utf-8")
        job = self.store.create_job(name=checked.config.resolved_output_name, task=checked.task, priority=priority,
                                    spec=spec, jobs_dir=self.settings.jobs_dir, job_id=job_id)
        position = len(self.store.queue())
        self.emit(job["id"], "queued", {"priority": priority, "position": position})
        self._wake.set()
        return self.get(job["id"])

    def _roots(self) -> Roots:
        return Roots(read=list(self.settings.read_roots), write=[*self.settings.write_roots, self.settings.jobs_dir])

    def _preflight(self, config: dict, source: str, base_dir: str | None, deploy_dirs: list[str]):
        """shared.preflight.check with this daemon's roots; its refusals as protocol errors."""
        from shared.errors import UserError
        from shared.preflight import PathNotAllowed, check

        roots = self._roots()
        for folder in deploy_dirs:
            problem = confine(Path(folder), roots.write, "deploy_dirs", "write")
            if problem:
                raise ProtocolError("path_not_allowed", problem, "deploy_dirs")
        try:
            return check(config, source=source, base_dir=Path(base_dir) if base_dir else None, roots=roots,
                         require_absolute=base_dir is None)
        except PathNotAllowed as exc:
            raise ProtocolError("path_not_allowed", str(exc), f"config.{exc.key}") from None
        except UserError as exc:
            raise ProtocolError("invalid_config", str(exc), "config") from None

    async def _submit_label(self, config: dict, *, base_dir: str | None, source: str, priority: int) -> dict:
        """An auto-label job: caption a folder with CLIP in a worker, queued like training."""
        from shared.autolabel.job import label_options
        from shared.errors import UserError
        from shared.preflight import PathNotAllowed

        try:
            options = await asyncio.to_thread(label_options, config, source=source, roots=self._roots(),
                                              base_dir=Path(base_dir) if base_dir else None,
                                              require_absolute=base_dir is None)
        except PathNotAllowed as exc:
            raise ProtocolError("path_not_allowed", str(exc), f"config.{exc.key}") from None
        except UserError as exc:
            raise ProtocolError("invalid_config", str(exc), "config") from None
        label = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        spec = {"kind": "label", "source": source, "base_dir": base_dir, "label": label, "deploy_dirs": []}
        return self._queue(f"label-{Path(options['input_dir']).name}", "label", spec, priority)

    async def _submit_tool(self, kind: str, config: dict, *, base_dir: str | None, source: str,
                           priority: int) -> dict:
        """A LoRA tool job (resize, merge, ...): its options and paths checked here, run in a worker."""
        from shared.errors import UserError
        from shared.preflight import PathNotAllowed
        from shared.sd.lora_tools.job import job_name, tool_job

        try:
            checked = await asyncio.to_thread(tool_job, kind, config, source=source, roots=self._roots(),
                                              base_dir=Path(base_dir) if base_dir else None,
                                              require_absolute=base_dir is None)
        except PathNotAllowed as exc:
            raise ProtocolError("path_not_allowed", str(exc), f"config.{exc.key}") from None
        except UserError as exc:
            raise ProtocolError("invalid_config", str(exc), "config") from None
        spec = {"kind": kind, "source": source, "base_dir": base_dir, **checked, "deploy_dirs": []}
        return self._queue(job_name(kind, spec), kind, spec, priority)

    def _queue(self, name: str, task: str, spec: dict, priority: int) -> dict:
        """Store a checked job that is not training and wake the scheduler."""
        job = self.store.create_job(name=name, task=task, priority=priority, spec=spec, jobs_dir=self.settings.jobs_dir)
        Path(job["job_dir"]).mkdir(parents=True, exist_ok=True)
        self.emit(job["id"], "queued", {"priority": priority, "position": len(self.store.queue())})
        self._wake.set()
        return self.get(job["id"])

    def stop(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["state"] == "queued":  # nothing trained yet: there is nothing to save
            return self._cancel_queued(job, "stopped before it started")
        if job["state"] != "running":
            raise ProtocolError("bad_state", f"job {job_id} is {job['state']}; only queued or running jobs stop",
                                "job")
        if not job["stop_requested"]:
            worker = self.workers.get(job_id)
            if worker and worker.process.stdin:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    worker.process.stdin.write(b"stop\n")
            self.emit(job_id, "stopping", {"reason": "stop requested: saving what was trained"},
                      stop_requested=1)
        return self.get(job_id)

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["state"] == "queued":
            return self._cancel_queued(job, "cancelled while queued")
        if job["state"] != "running":
            raise ProtocolError("bad_state", f"job {job_id} is {job['state']}; only queued or running jobs can be "
                                "cancelled", "job")
        worker = self.workers.get(job_id)
        if worker is None:  # its process is being started: _launch sees the state and kills it
            return self._cancel_queued(job, "cancelled while starting")
        worker.cancelled = True
        kill_worker(worker.process)  # discard: no save, the processes and their GPU memory go away at once
        return job

    def _cancel_queued(self, job: dict, reason: str) -> dict:
        self.emit(job["id"], "cancelled", {"reason": reason}, state="cancelled", finished_at=time.time())
        return self.get(job["id"])

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if job["state"] not in FINAL_STATES:
            raise ProtocolError("bad_state", f"job {job_id} is {job['state']}; cancel it before deleting", "job")
        self.store.delete(job_id)
        job_dir = Path(job["job_dir"]).resolve()
        if job_dir.is_relative_to(self.settings.jobs_dir.resolve()) and job_dir.is_dir():
            shutil.rmtree(job_dir, ignore_errors=True)

    async def deploy(self, job_id: str, checkpoint: int | None) -> dict:
        """Publish a saved checkpoint of a finished job (default: its best) into the job's deploy folders."""
        from daemon.deploy import deploy_checkpoint

        job = self.get(job_id)
        step, paths = await asyncio.to_thread(deploy_checkpoint, job, checkpoint, self._roots())
        with contextlib.suppress(OSError), open(Path(job["job_dir"]) / "job.log", "a", encoding="utf-8") as log:
            log.write(f"Deployed the checkpoint of step {step} to {', '.join(map(str, paths))}\n")
        return {"job": job_id, "step": step, "paths": [str(p) for p in paths]}

    def read_log(self, job_id: str, offset: int, max_bytes: int) -> dict:
        job = self.get(job_id)
        path = Path(job["job_dir"]) / "job.log"
        size = path.stat().st_size if path.is_file() else 0
        text = ""
        if path.is_file() and offset < size:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(max_bytes)
            offset += len(data)
            text = data.decode("utf-8", "replace")
        return {"job": job_id, "text": text, "offset": min(offset, size), "size": size}

    def queue_summary(self) -> dict:
        return {"running": list(self.workers), "queued": [j["id"] for j in self.store.queue()]}

    # --- running jobs ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self.workers) < self.settings.max_parallel_jobs and not self.shutting_down:
                queue = self.store.queue()
                if not queue:
                    break
                await self._launch(queue[0])

    async def _launch(self, job: dict) -> None:
        job_dir = Path(job["job_dir"])
        job_dir.mkdir(parents=True, exist_ok=True)
        attempt = job["attempts"] + 1
        spec = {**job["spec"], "resume": attempt > 1}
        (job_dir / RESULT_FILE).unlink(missing_ok=True)
        (job_dir / "job.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        # "running" before the spawn awaits, so a cancel meanwhile cannot see it as still queued
        self.store.update(job["id"], state="running", pid=None, attempts=attempt, started_at=time.time())
        with open(job_dir / "job.log", "ab") as log:
            log.write(f"--- attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon.worker", str(job_dir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=str(job_dir), env=env, limit=1 << 20,
                start_new_session=True,  # its own process group: cancel kills the ranks it launches too
            )
        worker = Worker(job["id"], process)
        self.workers[job["id"]] = worker
        if self.store.get(job["id"])["state"] != "running":  # cancelled while the process started
            worker.cancelled = True
            kill_worker(process)
        else:
            self.store.update(job["id"], pid=process.pid)
        if job["stop_requested"]:  # asked to stop before the daemon went down: still honour it
            process.stdin.write(b"stop\n")
        asyncio.create_task(self._supervise(worker, attempt), name=f"worker-{job['id']}")

    async def _supervise(self, worker: Worker, attempt: int) -> None:
        job_id = worker.job_id
        try:
            async for line in worker.process.stdout:
                self._handle_line(worker, attempt, line)
        except (ValueError, asyncio.LimitOverrunError):  # a line over 1 MiB: not a worker of ours talking
            worker.error = {"error": "the worker sent an unreadable message; see the job log", "cause": "crash"}
            kill_worker(worker.process)
        finally:
            code = await worker.process.wait()
            self.workers.pop(job_id, None)
            if not self.shutting_down:
                self._finish(worker, code)
                self._wake.set()

    def _handle_line(self, worker: Worker, attempt: int, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return  # not ours (the worker sends only JSON lines here)
        if "event" in msg:
            kind, data = msg["event"], msg.get("data") or {}
            updates = {}
            if kind == "progress":
                updates["progress"] = data
            if kind == "started":  # resumed: a re-run that really continues (the trainer says from where)
                data = {**data, "attempt": attempt, "resumed": attempt > 1 and int(data.get("step") or 0) > 0}
            self.emit(worker.job_id, kind, data, **updates)
        elif "result" in msg:
            worker.result = msg["result"]
        elif "error" in msg:
            worker.error = {"error": str(msg["error"]), "cause": msg.get("cause", "crash")}

    def _finish(self, worker: Worker, code: int) -> None:
        now = time.time()
        job_id = worker.job_id
        if self.store.get(job_id)["state"] in FINAL_STATES:  # already cancelled while it was starting
            return
        if worker.cancelled:  # discard: what the job itself saved on the way goes too (docs/protocol.md)
            job = self.store.get(job_id)
            removed = remove_cancelled_outputs(job, self.store.events(job_id))
            self.emit(job_id, "cancelled", {"reason": "cancelled while running", "removed": removed},
                      state="cancelled", pid=None, finished_at=now)
        elif worker.result is not None and code == 0:
            self.emit(job_id, "finished", worker.result, state="finished", result=worker.result,
                      pid=None, finished_at=now)
        else:
            failure = worker.error or {"error": f"the worker process {ended(code)} without a result; "
                                                "see the job log", "cause": "crash"}
            if failure["cause"] == "out_of_memory" and self._retry_leaner(job_id, failure):
                return
            self.emit(job_id, "failed", failure, state="failed", error=failure["error"],
                      error_cause=failure["cause"], pid=None, finished_at=now)

    def _retry_leaner(self, job_id: str, failure: dict) -> bool:
        """Queue a job that ran out of memory once more, with the next cheaper plan its trainer named in
        its `memory_plan` event; when it saved a training state, with a plan that state can continue (the
        re-run resumes from it). False where there is nothing to retry with: a second out-of-memory,
        `memory_budget: off`, no plan, no cheaper one."""
        job = self.store.get(job_id)
        spec = dict(job["spec"])
        config = dict(spec.get("config") or {})
        if spec.get("memory_retry") or str(config.get("memory_budget", "auto")).lower() == "off":
            return False
        events = self.store.events(job_id)
        plans = [e["data"] for e in events if e["kind"] == "memory_plan"]
        if not plans:
            return False
        plan = plans[-1]
        saved = any(e["kind"] == "checkpoint" and e["data"].get("state") for e in events)
        target = plan.get("next_keeping_batch") if saved else plan.get("next")
        if not target:
            return False
        spec["config"] = {**config, **target["settings"]}
        spec["memory_retry"] = {"error": failure["error"], "settings": target["settings"]}
        self.store.update(job_id, spec=spec)
        job_dir = Path(job["job_dir"])
        if job_dir.is_dir():  # the job's readable copy follows what now runs
            (job_dir / "config.yaml").write_text(yaml.safe_dump(spec["config"], sort_keys=False), encoding="utf-8")
        self.emit(job_id, "memory_retry", {
            "reason": failure["error"], "attempt": job["attempts"], "resume": saved,
            "from": {"settings": plan["settings"], "estimate_gb": plan["estimate_gb"]},
            "to": {"settings": target["settings"], "estimate_gb": target["estimate_gb"], "changes": target["changes"]},
        }, state="queued", pid=None)
        return True


def ended(code: int) -> str:
    """How a worker process ended, in words (a negative code is the signal that killed it)."""
    if code >= 0:
        return f"ended with exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == getattr(signal, "SIGKILL", 9):
        return (f"was killed ({name}; by hand, or by the system when it ran out of memory: then lower "
                "batch_size or resolution)")
    return f"was killed by {name}"


def end_orphaned_worker(job: dict) -> None:
    """A worker of a daemon that died exits when its pipe closes; if it is still alive (stuck in a long
    native call) kill it, so the re-run never has two trainers writing the same files."""
    pid = job.get("pid")
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone (or no /proc: nothing to check it against)
        return
    if b"daemon.worker" not in cmdline or os.fsencode(job["job_dir"]) not in cmdline:
        return  # the pid was reused by an unrelated process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)


def remove_cancelled_outputs(job: dict, events: list[dict]) -> list[str]:
    """What a cancelled job wrote on the way, named in its own events: step checkpoints, training
    states, sample images, plus its hidden temporaries. Only those paths, and only inside the job's
    output and log folders: a file the user or another job put there is never touched."""
    config = (job.get("spec") or {}).get("config") or {}
    if not config.get("output_dir"):  # not training: a LoRA tool job's temporaries at most
        return remove_job_leftovers(job)
    output_dir = Path(config["output_dir"]).resolve()
    roots = [output_dir, Path(config.get("log_dir") or output_dir / "logs").resolve()]
    written = []
    for event in events:
        data = event.get("data") or {}
        if event.get("kind") == "checkpoint":
            written += [data.get("path"), data.get("state")]
        elif event.get("kind") in ("sample", "evaluation"):
            written += data.get("paths") or []
    def inside(path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved.is_relative_to(root) and resolved != root for root in roots)

    removed = []
    for name in dict.fromkeys(p for p in written if p):
        path = Path(name)
        if not inside(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            continue
        removed.append(str(path))
    removed += remove_job_leftovers(job)
    for folder in {Path(p).parent for p in written if p}:  # checkpoints/, samples/ when nothing else is left
        if inside(folder):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return removed


def remove_job_leftovers(job: dict) -> list[str]:
    """The hidden temporaries a killed job left in the folders it writes (never a finished file)."""
    from shared.files import remove_leftovers

    spec = job.get("spec") or {}
    config = spec.get("config") or {}
    if spec.get("output"):  # a LoRA tool job: the folder and name it writes were fixed at submit
        return [str(p) for p in remove_leftovers(Path(spec["output"]["folder"]), spec["output"]["stem"])]
    if not config.get("output_dir"):
        return []
    output_dir = Path(config["output_dir"])
    stem = config.get("output_name") or output_dir.name
    removed = remove_leftovers(output_dir / "checkpoints")  # the job's own folder
    removed += remove_leftovers(output_dir, stem)  # may be a shared Lora folder
    for folder in [config.get("deploy_dir"), *spec.get("deploy_dirs", [])]:
        if folder:
            removed += remove_leftovers(Path(folder), stem)
    if config.get("textgen_dir"):  # an LLM adapter's copy in text-generation-webui's loras folder
        from shared.errors import UserError
        from shared.llm.deploy import textgen_loras_dir  # no torch: paths and JSON only

        with contextlib.suppress(UserError, OSError):
            removed += remove_leftovers(textgen_loras_dir(Path(config["textgen_dir"])), stem)
    return [str(p) for p in removed]
