"""One rank of a data-parallel run: `python -m shared.distributed RUN_DIR`, started by `accelerate launch`.

shared/training/launch.py starts the ranks and describes the run folder they share with it. Each
rank reads the config from `spec.json` and runs the training loop (shared/train.py); rank 0 sends
its log lines and events into `events.jsonl` for the launcher to replay and answers stop requests
from the `stop` file, the other ranks stay silent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from shared.config import TrainConfig
from shared.errors import UserError
from shared.files import atomic_write
from shared.reporting import Reporter
from shared.train import train_task


class SilentReporter(Reporter):
    """For every rank but 0: the main process alone speaks."""

    def log(self, message: str) -> None:
        pass


class RankZeroReporter(Reporter):
    """Rank 0's events and log lines into the run folder, for the launcher to replay."""

    def __init__(self, run_dir: Path, launcher_pid: int):
        self.run_dir = run_dir
        self.launcher_pid = launcher_pid
        self._out = open(run_dir / "events.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _send(self, msg: dict) -> None:
        self._out.write(json.dumps(msg, default=str) + "\n")
        self._out.flush()

    def log(self, message: str) -> None:
        self._send({"log": message})

    def event(self, kind: str, **data) -> None:
        self._send({"event": kind, "data": data})

    def stop_requested(self) -> bool:
        return (self.run_dir / "stop").exists()

    def launcher_gone(self) -> bool:
        try:
            os.kill(self.launcher_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def child_main(run_dir: Path) -> int:
    from accelerate import PartialState

    spec = json.loads((run_dir / "spec.json").read_text(encoding="utf-8"))
    cfg = TrainConfig.from_canonical(spec["config"])  # checked once, by the pre-flight before the launch
    # Without a GPU accelerate only joins the ranks when told it runs on the CPU (gloo); otherwise
    # each rank would quietly train alone.
    cpu = cfg.device == "cpu" or not _has_gpu()
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"accelerate started {os.environ['WORLD_SIZE']} processes but they did not join "
                           f"({state.distributed_type}); check the accelerate config and the devices")
    main = state.is_main_process
    reporter = RankZeroReporter(run_dir, spec["launcher_pid"]) if main else SilentReporter()
    try:
        result = train_task(cfg, reporter)
    except UserError as exc:
        if main:
            text = json.dumps({"error": str(exc)})
            atomic_write(run_dir / "error.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if main:
        data = {"output_path": str(result.output_path),
                "deployed_path": str(result.deployed_path) if result.deployed_path else None,
                "steps": result.steps, "losses": result.losses, "stopped_early": result.stopped_early,
                "checkpoints": [str(p) for p in result.checkpoints], "memory": result.memory}
        atomic_write(run_dir / "result.json", lambda p: Path(p).write_text(json.dumps(data), encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(Path(sys.argv[1])))
