"""The command-line client of a running daemon: submit, jobs, status, follow, stop, cancel, logs, ...

Uses `shared.client` (websockets only); never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shared.client import DaemonClient, eta_text


def _connect(args: argparse.Namespace) -> DaemonClient:
    return DaemonClient.connect(args.state_dir, port=args.port)


class ProgressBar:
    """One line redrawn in place on a terminal; on a pipe, a line every 10% so logs stay short."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.last_tenth = -1
        self.open = False

    def update(self, d: dict) -> None:
        step, total = d.get("step", 0), max(1, d.get("total", 1))
        filled = int(self.width * step / total)
        bar = "#" * filled + "." * (self.width - filled)
        if "loss" in d:
            line = (f"[{bar}] {step}/{total} loss {d.get('loss', 0):.4f} lr {d.get('lr', 0):.2e} "
                    f"{d.get('it_s') or 0:.2f} it/s {eta_text(d.get('it_s'), d.get('eta_s'))}")
        else:  # not training: an auto-label or LoRA tool job counts images or modules
            line = f"[{bar}] {step}/{total} {str(d.get('what') or '')[:40]:<40}"  # fixed width: redrawn in place
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
            self.open = True
        elif step * 10 // total > self.last_tenth or step == total:
            self.last_tenth = step * 10 // total
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False
        print(text, file=self.stream, flush=True)


def follow_job(client: DaemonClient, job_id: str, after: int = 0) -> int:
    bar = ProgressBar()
    for event in client.follow(job_id, after=after):
        kind, data = event["kind"], event["data"]
        if kind == "progress":
            bar.update(data)
        elif kind == "queued":
            bar.message(f"queued (priority {data.get('priority', 0)})")
        elif kind == "started":
            again = ""
            if data.get("attempt", 1) > 1:
                again = (f" (resumed at step {data.get('step')} after an interruption)" if data.get("resumed")
                         else " (started again from step 0 after an interruption: no training state was saved)")
            bar.message(f"started: {data.get('total')} steps, attempt {data.get('attempt', 1)}{again}")
        elif kind == "checkpoint":
            bar.message(f"checkpoint at step {data.get('step')}: {data.get('path')}")
        elif kind == "verdict":
            bar.message(f"warning at step {data.get('step')}: {data.get('title')}: {data.get('message')}")
        elif kind == "interrupted":
            bar.message(f"interrupted: {data.get('reason')}")
        elif kind == "stopping":
            bar.message("stopping: saving what was trained")
        elif kind == "finished":
            where = ", ".join(data.get("deployed") or []) or data.get("lora")
            if data.get("captions") is not None:  # an auto-label job
                bar.message(f"labelled {len(data['captions'])} images: {data.get('output')}")
                return 0
            if data.get("tool"):  # a LoRA tool job
                bar.message(data.get("summary") or "")
                return 0
            bar.message(f"finished after {data.get('steps')} steps: {where}")
            if data.get("task", "sd") in ("sd", "flux"):
                bar.message(f"use it as <lora:{data.get('lora_name')}:0.8>")
            for line in evidence_lines(data, job_id):
                bar.message(line)
            return 0
        elif kind == "failed":
            bar.message(f"error: {data.get('error')}")
            return 1
        elif kind == "cancelled":
            bar.message(f"cancelled: {data.get('reason')}")
            return 1
    return 1


def evidence_lines(result: dict, job_id: str) -> list[str]:
    """What the evaluation concluded: the warnings, the checkpoint to prefer (and how), the report."""
    lines = [f"warning: {v['title']}: {v['message']}" for v in result.get("verdicts") or []]
    best = result.get("best_checkpoint") or {}
    if best and not best.get("final"):
        lines.append(f"best checkpoint: step {best['step']} ({best.get('by')}); use it instead of the last with "
                     f"`python -m daemon deploy {job_id} --checkpoint {best['step']}`")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return lines


def _cmd_submit(args: argparse.Namespace) -> int:
    from shared.config import read_config_file

    path = Path(args.config)
    data = read_config_file(path, args.set)
    # YAML dates, sets, ... are not JSON: send what YAML gave us as text the config parser understands
    data = json.loads(json.dumps(data, default=str))
    with _connect(args) as client:
        job = client.submit(data, base_dir=path.resolve().parent, source=str(path), priority=args.priority,
                            deploy_dirs=[str(Path(d).resolve()) for d in args.deploy])
        print(f"submitted job {job['id']} ({job['name']})", flush=True)
        if args.follow:
            return follow_job(client, job["id"])
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        jobs = client.jobs(args.state or None, limit=args.limit)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'JOB':<24} {'STATE':<10} {'PRIO':>4} {'PROGRESS':>11}  NAME")
    for job in jobs:
        progress = job.get("progress") or {}
        steps = f"{progress.get('step', 0)}/{progress.get('total', '?')}" if progress else "-"
        print(f"{job['id']:<24} {job['state']:<10} {job['priority']:>4} {steps:>11}  {job['name']}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.get(args.job)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    lines = [("job", job["id"]), ("name", job["name"]), ("task", job["task"]), ("state", job["state"]),
             ("priority", job["priority"]), ("attempts", job["attempts"]), ("folder", job["job_dir"])]
    progress = job.get("progress")
    if progress:
        lines.append(("progress", f"step {progress['step']}/{progress['total']}, loss {progress['loss']:.4f}"))
    if job.get("result"):
        result = job["result"]
        lines += [("lora", result.get("lora")), ("deployed", ", ".join(result.get("deployed") or []) or "-"),
                  ("use as", f"<lora:{result.get('lora_name')}:0.8>")]
        for verdict in result.get("verdicts") or []:
            lines.append(("warning", f"{verdict['title']}: {verdict['message']}"))
        best = result.get("best_checkpoint") or {}
        if best:
            lines.append(("best", f"step {best['step']} ({best.get('by')}): {best.get('path')}"))
        if result.get("report"):
            lines.append(("report", result["report"]))
    if job.get("error"):
        lines.append(("error", job["error"]))
    for key, value in lines:
        print(f"{key + ':':<10} {value}")
    return 0


def _cmd_follow(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        return follow_job(client, args.job, after=args.after)


def _cmd_stop(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.stop(args.job)
    print(f"job {job['id']}: {'stop requested' if job['state'] == 'running' else job['state']}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.cancel(args.job)
    print(f"job {job['id']}: cancel requested" if job["state"] == "running" else f"job {job['id']}: {job['state']}")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        client.delete(args.job)
    print(f"job {args.job} deleted")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        offset = 0
        while True:
            chunk = client.logs(args.job, offset=offset)
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            offset = chunk["offset"]
            if offset >= chunk["size"]:
                if not args.follow or client.get(args.job)["state"] not in ("queued", "running"):
                    return 0
                time.sleep(1)


def _cmd_deploy(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        reply = client.deploy(args.job, args.checkpoint)
    for path in reply["paths"]:
        print(f"deployed the checkpoint of step {reply['step']} to {path}"
              + (f" (use it as <lora:{Path(path).stem}:0.8>)" if path.endswith(".safetensors") else ""))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info = client.info()
    info.pop("v", None)
    info.pop("id", None)
    info.pop("type", None)
    print(json.dumps(info, indent=2))
    return 0


def add_client_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="the daemon's state folder (token and port; default as for serve)")
    common.add_argument("--port", type=int, help="the daemon's port (default: from <state-dir>/daemon.json)")

    def job_command(name: str, help: str, func, **extra):
        p = sub.add_parser(name, help=help, parents=[common])
        p.add_argument("job", help="job id (see `jobs`)")
        p.set_defaults(func=func)
        return p

    submit = sub.add_parser("submit", help="send a YAML config to the daemon's queue", parents=[common])
    submit.add_argument("config", help="the YAML config (as for `train`)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--deploy", action="append", default=[], metavar="DIR",
                        help="another Lora folder to place the result in (repeatable)")
    submit.add_argument("--follow", "-f", action="store_true", help="show progress until the job ends")
    submit.set_defaults(func=_cmd_submit)

    jobs = sub.add_parser("jobs", help="list the daemon's jobs, newest first", parents=[common])
    jobs.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(func=_cmd_jobs)

    status = job_command("status", "show one job", _cmd_status)
    status.add_argument("--json", action="store_true", help="the whole job record as JSON")
    follow = job_command("follow", "show a job's progress until it ends", _cmd_follow)
    follow.add_argument("--after", type=int, default=0, help="only events after this sequence number")
    job_command("stop", "stop a job: save what was trained and finish", _cmd_stop)
    job_command("cancel", "cancel a job: stop at once, keep nothing", _cmd_cancel)
    job_command("delete", "forget a finished job and remove its folder", _cmd_delete)
    logs = job_command("logs", "print a job's log", _cmd_logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing while the job runs")

    deploy = job_command("deploy", "publish a saved checkpoint of a finished job into its deploy folders "
                         "(default: the best checkpoint its evaluation named)", _cmd_deploy)
    deploy.add_argument("--checkpoint", type=int, metavar="STEP",
                        help="the step of the checkpoint (see `status JOB` and the job's report.html)")

    info = sub.add_parser("info", help="daemon version, devices, free VRAM and queue", parents=[common])
    info.set_defaults(func=_cmd_info)
