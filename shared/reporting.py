"""How a training run talks to whoever runs it: log lines, structured events, and stop requests.

The CLI uses `ConsoleReporter` (log lines and a tqdm bar); the daemon's worker passes its own
reporter that turns events into websocket messages and answers `stop_requested` from the job queue.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class Reporter:
    def log(self, message: str) -> None:
        print(message, flush=True)

    def event(self, kind: str, **data) -> None:
        """One training event: the kinds and their fields are in shared/training/events.py."""

    def stop_requested(self) -> bool:
        """True asks the trainer to save what it has trained and finish at the next step boundary."""
        return False


class ConsoleReporter(Reporter):
    def __init__(self, stream=None, show_bar: bool = True):
        self.stream = stream or sys.stdout
        self.show_bar = show_bar
        self._bar = None

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def event(self, kind: str, **data) -> None:
        if not self.show_bar:
            return
        if kind == "started":
            from tqdm import tqdm

            self._bar = tqdm(total=data["total"], desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
        elif kind == "progress" and self._bar is not None:
            self._bar.n = data["step"]
            self._bar.set_postfix(loss=f"{data['loss']:.4f}", lr=f"{data['lr']:.2e}", refresh=False)
            self._bar.refresh()
            if data["step"] >= data["total"]:
                self._bar.close()
                self._bar = None
        elif kind == "finished" and self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class TrainResult:
    """What a training run left: the adapter in output_dir, its copies in the deploy folders, and how it went."""

    output_path: Path
    deployed: list[Path] = field(default_factory=list)  # deploy_dir first, then the client's folders
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stopped_early: bool = False
    outputs: dict[str, str] = field(default_factory=dict)  # the `finished` event's outputs
    memory: dict = field(default_factory=dict)  # the planner's estimate beside the measured peak
    # the evaluation's conclusions (shared/evaluation/judge.py)
    verdicts: list[dict] = field(default_factory=list)
    best_checkpoint: dict | None = None
    report: Path | None = None
    evaluation_seconds: float = 0.0
    job_seconds: float = 0.0

    @property
    def deployed_path(self) -> Path | None:
        """The first deployed copy (the one `deploy_dir` names), or None."""
        return self.deployed[0] if self.deployed else None

    def to_json(self) -> dict:
        return {"output_path": str(self.output_path), "deployed": [str(p) for p in self.deployed],
                "steps": self.steps, "losses": self.losses, "checkpoints": [str(p) for p in self.checkpoints],
                "stopped_early": self.stopped_early, "outputs": self.outputs, "verdicts": self.verdicts,
                "best_checkpoint": self.best_checkpoint, "report": str(self.report) if self.report else None,
                "evaluation_seconds": self.evaluation_seconds, "job_seconds": self.job_seconds,
                "memory": self.memory}

    @classmethod
    def from_json(cls, data: dict) -> TrainResult:
        return cls(output_path=Path(data["output_path"]), deployed=[Path(p) for p in data["deployed"]],
                   steps=data["steps"], losses=list(data["losses"]),
                   checkpoints=[Path(p) for p in data["checkpoints"]], stopped_early=data["stopped_early"],
                   outputs=dict(data.get("outputs") or {}), verdicts=list(data.get("verdicts") or []),
                   best_checkpoint=data.get("best_checkpoint"),
                   report=Path(data["report"]) if data.get("report") else None,
                   evaluation_seconds=data.get("evaluation_seconds", 0.0), job_seconds=data.get("job_seconds", 0.0),
                   memory=dict(data.get("memory") or {}))


class Throughput:
    """Steps per second over the recent window, and the time left (None until there is a rate: the
    first step has no duration to measure, and "0:00 left" there would be a lie)."""

    def __init__(self, total: int, window: int = 20):
        self.total = total
        self.window = window
        self.times: list[float] = []

    def tick(self, step: int) -> tuple[float, float | None]:
        now = time.perf_counter()
        self.times.append(now)
        self.times = self.times[-self.window :]
        if len(self.times) < 2:
            return 0.0, None
        rate = (len(self.times) - 1) / (self.times[-1] - self.times[0])
        return rate, max(0, self.total - step) / rate
