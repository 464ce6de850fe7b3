"""One job (training, auto-label, a LoRA tool) in its own process: `python -m daemon.worker JOB_DIR`
(started by the daemon).

A process per job means cancel is a reliable kill, a crash or out-of-memory cannot take the daemon
down, and all GPU memory is released when the job ends. The daemon itself never imports torch.

Talking to the daemon, over the process's standard streams:
- stdout carries one JSON object per line: `{"event": KIND, "data": {...}}` for trainer events, then
  one `{"result": {...}}` or `{"error": "...", "cause": CAUSE}` (CAUSE: `user` for bad input,
  `out_of_memory`, `disk_full`, else `crash`). Everything else the job
  prints (libraries, tracebacks) goes to the job's log file, never into this channel.
- stdin carries commands: a line `stop` asks the trainer to save what it has trained and finish at
  the next step boundary. End of file means the daemon is gone (killed, say): the worker exits at
  once, so a restarted daemon can run the job again without two trainers writing the same files.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import traceback
from pathlib import Path

from shared import faults
from shared.schema.lora_tools import KINDS as LORA_TOOL_KINDS

# The TrainConfig key that asks the trainers to continue from the newest checkpoint in output_dir.
RESUME_KEY = "resume"
RESUME_LATEST = "latest"
DAEMON_GONE_EXIT = 75
RESULT_FILE = "result.json"
PUBLISH_JOURNAL = "publish.json"  # what the trainer published, for a re-run after a kill


class Channel:
    """The JSON-lines pipe to the daemon (the original stdout, kept before it is pointed at the log)."""

    def __init__(self, fd: int):
        self._out = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def send(self, **msg) -> None:
        line = json.dumps(msg, default=str)
        with self._lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (BrokenPipeError, OSError):
                os._exit(DAEMON_GONE_EXIT)


def watch_commands(stop: threading.Event) -> None:
    """Read commands from the daemon; end of input means the daemon died, so this process ends too."""
    pending = b""
    while True:
        chunk = os.read(0, 4096)  # raw reads: a buffered stdin would block interpreter shutdown
        if not chunk:
            os._exit(DAEMON_GONE_EXIT)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if any(line.strip() == b"stop" for line in lines):
            stop.set()


def make_reporter(channel: Channel, stop: threading.Event):
    from shared.reporting import Reporter

    class WorkerReporter(Reporter):
        """Trainer events go to the daemon, which numbers, stores and broadcasts them."""

        def log(self, message: str) -> None:
            print(message, flush=True)  # the job's log file

        def event(self, kind: str, **data) -> None:
            if kind == "progress":
                self.last_step = data.get("step")
                faults.hit("step", data.get("step"))
            if kind in ("finished", "label_finished"):
                return  # the worker reports the final result itself, after any extra deploys
            if kind == "label_started":  # auto-label jobs use the same progress events as training
                kind = "started"
            elif kind == "label_progress":
                kind, data = "progress", {"step": data["done"], "total": data["total"]}
            channel.send(event=kind, data=data)

        def stop_requested(self) -> bool:
            return stop.is_set()

    reporter = WorkerReporter()
    reporter.last_step = None
    return reporter


def explain_failure(exc: BaseException, task: str | None, step: int | None) -> tuple[str, str]:
    """One line and a cause for an exception out of a job: the ones people can act on get advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f" at step {step}" if step else ""
    if type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and "out of memory" in text.lower()):
        smaller = "max_seq_len" if task == "llm" else "resolution"
        levers = ("set fp8_base: true or a larger blocks_to_swap" if task == "flux"
                  else "set gradient_checkpointing: true")
        return (f"out of GPU memory{where}: lower batch_size or {smaller}, {levers}, "
                f"or close other programs using the GPU ({text})", "out_of_memory")
    if isinstance(exc, MemoryError):
        return (f"out of memory (RAM){where}: lower batch_size, or close other programs", "out_of_memory")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full{where} (writing {exc.filename or 'a file'}): free some space and run the "
                "job again; files already saved are kept", "disk_full")
    return f"{type(exc).__name__}: {text}", "crash"


def dry_run(cfg, task: str, channel: Channel) -> dict:
    """A validation-only job: check the config and the dataset again, in the worker, and report as a
    job does (started, progress, result) without importing torch or writing any file but result.json.
    The load tests queue these by the hundred; a user can use them to check a config on the daemon."""
    channel.send(event="started", data={"total": 1, "dry_run": True})
    images = None
    if task in ("sd", "flux"):
        from shared.images.dataset import scan_dataset

        images = len(scan_dataset(cfg.train_data_dir, cfg.metadata_path).items)
    channel.send(event="progress", data={"step": 1, "total": 1})
    return {"task": task, "dry_run": True, "lora": None, "deployed": [], "lora_name": cfg.resolved_output_name,
            "steps": 0, "stopped_early": False, "final_loss": None, "checkpoints": [], "images": images}


def job_config(spec: dict):
    """The job's TrainConfig, rebuilt from the canonical dict the daemon's pre-flight stored (not checked
    again); on a re-run, ask the trainer to resume where possible."""
    from shared.config import TrainConfig

    data = dict(spec["config"])
    if spec.get("resume") and data.get(RESUME_KEY) in (None, ""):
        data[RESUME_KEY] = RESUME_LATEST
    return TrainConfig.from_canonical(data)


def report(job_dir: Path, channel: Channel, outcome: dict) -> int:
    """The job's result: on disk first (if the daemon dies before it hears this, its next start finishes the
    job from this file instead of running it, and deploying, a second time), then to the daemon."""
    from shared.files import atomic_write

    atomic_write(job_dir / RESULT_FILE, lambda p: Path(p).write_text(json.dumps(outcome), encoding="utf-8"))
    channel.send(result=outcome)
    return 0


def run(job_dir: Path, channel: Channel, stop: threading.Event) -> int:
    from shared.errors import UserError

    spec = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    task, reporter = None, make_reporter(channel, stop)
    try:
        if spec.get("kind") == "label":
            from shared.autolabel.labeller import label_folder

            outcome = label_folder(**spec["label"], reporter=reporter).as_dict()
            return report(job_dir, channel, outcome)
        if spec.get("kind") in LORA_TOOL_KINDS:
            from shared.sd.lora_tools.job import run_tool

            outcome = run_tool(spec["kind"], spec["options"], spec["output"], reporter)
            return report(job_dir, channel, outcome)
        cfg = job_config(spec)
        from shared.config import detect_task

        task = detect_task(cfg)
        if spec.get("dry_run"):
            outcome = dry_run(cfg, task, channel)
            return report(job_dir, channel, outcome)
        faults.hit("load", cfg.resolved_output_name)
        from shared.train import run_training

        # the client's Lora folders get their copies from the trainer, which commits every output
        # exactly once: a re-run after a kill completes what the first attempt began, under its names
        result = run_training(cfg, reporter, deploy_dirs=[Path(d) for d in spec.get("deploy_dirs") or []],
                              journal=job_dir / PUBLISH_JOURNAL, rerun=bool(spec.get("resume")))
        deployed = [str(p) for p in result.deployed]
        name_source = Path(deployed[0]) if deployed else result.output_path
        outcome = {
            "task": task,
            "lora": str(result.output_path),
            "deployed": deployed,
            "lora_name": name_source.stem,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "final_loss": result.losses[-1] if result.losses else None,
            "checkpoints": [str(p) for p in result.checkpoints],
            "memory": result.memory,  # the planner's estimate beside the measured peak
            # the evaluation (shared/evaluation): warnings, the checkpoint to prefer, the report
            "verdicts": result.verdicts,
            "best_checkpoint": result.best_checkpoint,
            "report": str(result.report) if result.report else None,
            "evaluation_s": round(result.evaluation_seconds, 3),
        }
        return report(job_dir, channel, outcome)
    except UserError as exc:
        print(f"error: {exc}", flush=True)
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)  # a WriteError into a full disk
        channel.send(error=str(exc), cause="disk_full" if full else "user")
        return 2
    except Exception as exc:  # the full traceback goes to the log, one line (with advice if any) to the client
        traceback.print_exc()
        message, cause = explain_failure(exc, task, reporter.last_step)
        print(f"error: {message}", flush=True)
        channel.send(error=message, cause=cause)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    channel = Channel(os.dup(1))
    os.dup2(2, 1)  # from here on, anything printed lands in the job's log (the daemon points stderr there)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    stop = threading.Event()
    threading.Thread(target=watch_commands, args=(stop,), daemon=True, name="daemon-commands").start()
    return run(Path(argv[0]), channel, stop)


if __name__ == "__main__":
    sys.exit(main())
