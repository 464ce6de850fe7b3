"""Data-parallel runs: start the trainer through `accelerate launch`, and talk to its main process.

`run_training` (shared/train.py) comes here when a config asks for more than one process (or names
an `accelerate_config`). The launching process (the CLI, or the daemon's worker) keeps its reporter;
the ranks it starts run `python -m shared.distributed RUN_DIR` (each rank's entry point), which
re-reads the config and runs the training loop. Between them lies a run folder (a file channel,
because torch's launcher does not pass inherited file descriptors on to the ranks):

- `spec.json`: the config (every key, paths absolute), what shared/train.py's run_training got besides
  it (extra deploy folders, the publish journal) and the launcher's pid;
- `events.jsonl`: rank 0 appends one JSON object a line, `{"event": KIND, "data": {...}}` or
  `{"log": "..."}`; the launcher tails it and replays each line to its own reporter, so the
  worker's JSON-lines channel to the daemon stays a single stream from the main rank;
- `stop`: the launcher creates it when its reporter asks to stop; rank 0 sees it and broadcasts the
  request to every rank at the next step boundary (all ranks stop at the same step and rank 0 saves);
- `result.json` / `error.json`: what rank 0 returns, or the one-line user error that ended it.

Only rank 0 writes checkpoints, exports, samples, TensorBoard and events; other ranks get a silent
reporter. If the launcher disappears (the daemon's worker killed without its process group), rank 0
notices and every rank exits at the next step, so no orphaned trainer keeps the GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.config import TrainConfig
from shared.errors import UserError
from shared.reporting import Reporter, TrainResult
from shared.training.precision import launch_device, resolve_mixed_precision

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `shared/`
DEFAULT_MULTI_NODE_PORT = 29500
POLL_S = 0.2


def in_launched_process() -> bool:
    """True inside a rank that `accelerate launch` (or torchrun) started: never launch again."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(cfg: TrainConfig) -> bool:
    return (cfg.num_processes > 1 or cfg.accelerate_config is not None) and not in_launched_process()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: TrainConfig, run_dir: Path, port: int | None = None) -> list[str]:
    """The `accelerate launch` command line for this machine. Without an accelerate config file,
    `--multi_gpu` is what gives several processes even on a CPU-only box (gloo; `--cpu` with
    several processes silently runs a single one)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config is not None:
        cmd += ["--config_file", str(cfg.accelerate_config)]
    else:
        if cfg.num_processes > 1:
            cmd += ["--multi_gpu"]
        cmd += ["--mixed_precision", resolve_mixed_precision(cfg.mixed_precision, launch_device(cfg)),
                "--dynamo_backend", "no"]
    if cfg.num_processes > 1 or cfg.accelerate_config is None:
        cmd += ["--num_processes", str(cfg.num_processes)]
    if cfg.num_machines > 1 or cfg.accelerate_config is None:
        cmd += ["--num_machines", str(cfg.num_machines)]
    if cfg.num_machines > 1:
        cmd += ["--machine_rank", str(cfg.machine_rank)]
    if cfg.main_process_ip:
        cmd += ["--main_process_ip", cfg.main_process_ip]
    if port is None:
        port = cfg.main_process_port
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "shared.distributed", str(run_dir)]


def _port_for(cfg: TrainConfig) -> int | None:
    if cfg.main_process_port is not None:
        return cfg.main_process_port
    if cfg.accelerate_config is not None:
        return None  # the file's own port (or accelerate's default)
    return DEFAULT_MULTI_NODE_PORT if cfg.num_machines > 1 else free_port()


def launch_training(cfg: TrainConfig, reporter: Reporter, *, deploy_dirs=(), journal: Path | None = None,
                    rerun: bool = False) -> TrainResult:
    """Run the config's trainer in `accelerate launch`, replaying rank 0's events to `reporter`."""
    run_dir = Path(tempfile.mkdtemp(prefix="lora-daemon-run-"))
    try:
        spec = {"config": cfg.to_dict(), "launcher_pid": os.getpid(), "deploy_dirs": [str(d) for d in deploy_dirs],
                "journal": str(journal) if journal else None, "rerun": rerun}
        (run_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        cmd = launch_command(cfg, run_dir, _port_for(cfg))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        reporter.log(f"Launching {cfg.num_processes} processes on {cfg.num_machines} machine(s) "
                     f"(this is machine {cfg.machine_rank}): {' '.join(cmd[1:])}")
        sys.stdout.flush()
        sys.stderr.flush()
        # same process group as this one: the daemon's cancel kills the group, Ctrl-C reaches every rank
        process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            code = _follow(process, run_dir, reporter)
        except BaseException:
            process.kill()
            process.wait()
            raise
        return _outcome(code, run_dir, cfg)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _follow(process: subprocess.Popen, run_dir: Path, reporter: Reporter) -> int:
    events = run_dir / "events.jsonl"
    offset, pending, stop_sent = 0, b"", False
    while True:
        code = process.poll()
        if events.exists():
            with open(events, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _replay(line, reporter)
        if code is not None:
            return code
        if not stop_sent and reporter.stop_requested():
            (run_dir / "stop").touch()
            stop_sent = True
        time.sleep(POLL_S)


def _replay(line: bytes, reporter: Reporter) -> None:
    if not line.strip():
        return
    msg = json.loads(line)
    if "log" in msg:
        reporter.log(msg["log"])
    else:
        reporter.event(msg["event"], **msg["data"])


def _outcome(code: int, run_dir: Path, cfg: TrainConfig) -> TrainResult:
    error = run_dir / "error.json"
    if error.is_file():
        raise UserError(json.loads(error.read_text(encoding="utf-8"))["error"])
    if code != 0:
        raise RuntimeError(f"accelerate launch exited with code {code}: see the ranks' output above")
    result = run_dir / "result.json"
    if not result.is_file():  # a machine other than 0: machine 0 writes the outputs
        return TrainResult(output_path=Path(cfg.output_dir))
    return TrainResult.from_json(json.loads(result.read_text(encoding="utf-8")))
