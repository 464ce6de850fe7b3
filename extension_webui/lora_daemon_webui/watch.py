"""Follow one daemon job in a background thread and keep what the tab shows of it.

The thread lives in the WebUI's process, not in the browser page: a page reload (or a second browser)
finds the same watch and shows the job from where it is, and the end-of-job work (bring the model
back, refresh the Lora list) happens even when no page is open.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .bridge import client

TERMINAL = ("finished", "failed", "cancelled")


@dataclass
class JobView:
    """What is known of a job from its events; `apply` is the only thing that changes it."""

    job_id: str
    name: str = ""
    state: str = "queued"
    step: int = 0
    total: int | None = None
    loss: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)  # the latest evaluation's
    verdicts: list[dict] = field(default_factory=list)  # the evaluation's warnings, as they came
    result: dict | None = None
    error: str | None = None
    note: str = ""
    version: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL or self.state == "lost"

    def apply(self, event: dict) -> None:
        kind, data = event.get("kind"), event.get("data") or {}
        if kind == "queued":
            self.state = "queued"
        elif kind == "started":
            self.state = "running"
            self.total = data.get("total", self.total)
            self.it_s = self.eta_s = None
            if data.get("attempt", 1) > 1:  # a re-run keeps the curve up to where it really continues
                start = int(data.get("step") or 0) if data.get("resumed") else 0
                self.losses = [(step, loss) for step, loss in self.losses if step <= start]
        elif kind == "progress":
            self.state = "running"
            self.step = int(data.get("step", self.step))
            self.total = data.get("total", self.total)
            self.loss, self.it_s, self.eta_s = data.get("loss"), data.get("it_s"), data.get("eta_s")
            if isinstance(self.loss, (int, float)):
                self.losses.append((self.step, float(self.loss)))
        elif kind == "sample":
            self.samples.extend(str(p) for p in data.get("paths", []))
        elif kind == "evaluation":
            self.scores = dict(data.get("scores") or {})
            self.samples.extend(str(p) for p in (data.get("paths") or [])[:1])  # its grid: base and LoRA side by side
        elif kind == "verdict":
            self.verdicts.append(data)
        elif kind == "stopping":
            self.note = "stopping: saving what is trained ..."
        elif kind == "interrupted":
            self.note = f"interrupted ({data.get('reason', 'daemon stopped')}); it will run again"
        elif kind == "finished":
            self.state = "finished"
            self.result = data
            self.note = "stopped early; saved" if data.get("stopped_early") else ""
        elif kind == "failed":
            self.state = "failed"
            self.error = data.get("error") or "the job failed (see its log)"
        elif kind == "cancelled":
            self.state = "cancelled"
            self.note = data.get("reason") or ""
        self.version += 1


class JobWatch:
    """A JobView kept current by a thread that follows the job on its own daemon connection."""

    def __init__(self, connect: Callable[[], object], job_id: str, name: str = "",
                 on_end: Callable[[JobView], None] | None = None):
        self.view = JobView(job_id=job_id, name=name)
        self._connect = connect
        self._on_end = on_end
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lora-daemon-watch-{job_id}", daemon=True)

    def start(self) -> JobWatch:
        self._thread.start()
        return self

    def snapshot(self) -> JobView:
        with self._lock:
            view = JobView(**{k: getattr(self.view, k) for k in self.view.__dataclass_fields__})
            view.losses, view.samples = list(self.view.losses), list(self.view.samples)
            view.scores, view.verdicts = dict(self.view.scores), list(self.view.verdicts)
            return view

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            with self._connect() as client:
                for event in client.follow(self.view.job_id):
                    with self._lock:
                        self.view.apply(event)
        except Exception as exc:  # the daemon went away for good: say so instead of spinning forever
            with self._lock:
                if not self.view.done:
                    self.view.state = "lost"
                    self.view.error = f"lost the daemon while following the job: {exc}"
                    self.view.version += 1
        if self._on_end is not None:
            try:
                self._on_end(self.snapshot())
            except Exception as exc:
                with self._lock:
                    self.view.note = (self.view.note + f" (after-job step failed: {exc})").strip()
                    self.view.version += 1


class Watches:
    """One watch per job id, shared by every page of this WebUI."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id: dict[str, JobWatch] = {}

    def get(self, job_id: str) -> JobWatch | None:
        with self._lock:
            return self._by_id.get(job_id)

    def ensure(self, job_id: str, factory: Callable[[], JobWatch]) -> JobWatch:
        with self._lock:
            watch = self._by_id.get(job_id)
            if watch is None:
                watch = self._by_id[job_id] = factory().start()
            return watch


def progress_line(view: JobView) -> str:
    """One line for the live view: `running · step 3/8 · loss 0.1123 · 2.10 it/s · ETA 0:04` (and
    `ETA estimating...` until the trainer has measured a rate)."""
    parts = [view.state]
    if view.total:
        parts.append(f"step {view.step}/{view.total}")
    if view.loss is not None:
        parts.append(f"loss {view.loss:.4f}")
    if view.it_s:
        parts.append(f"{view.it_s:.2f} it/s")
    if view.state == "running" and view.total:
        parts.append(client.eta_text(view.it_s, view.eta_s))
    if view.note:
        parts.append(view.note)
    return " · ".join(parts)


def evidence(view: JobView) -> str:
    """Markdown: what the evaluation found (warnings, scores), the checkpoint to prefer, the report."""
    verdicts = (view.result or {}).get("verdicts") if view.result else None
    verdicts = verdicts if verdicts is not None else view.verdicts
    lines = [f"**Warning: {v['title']}** (step {v['step']}): {v['message']}" for v in verdicts]
    numbers = ", ".join(f"{k} {v:.3g}" for k, v in view.scores.items()
                        if isinstance(v, (int, float)) and not k.startswith("base_"))
    if numbers:
        lines.append(("Evaluation: " if verdicts or view.state != "finished" else "**No problem found.** Evaluation: ")
                     + numbers)
    best = (view.result or {}).get("best_checkpoint") or {}
    if best and not best.get("final"):
        lines.append(f"Best checkpoint: step {best['step']} (by {best.get('by')}); **Deploy best checkpoint** places "
                     f"it in the Lora folder beside the last one.")
    report = (view.result or {}).get("report")
    if report:
        lines.append(f"Report: `{report}` (download it below and open it in a browser)")
    return "\n\n".join(lines)


def lora_prompt(result: dict | None, weight: float = 0.8) -> str:
    if not result or not result.get("lora_name"):
        return ""
    return f"<lora:{result['lora_name']}:{weight:g}>"


def wait_for_change(watch: JobWatch, last_version: int, timeout: float, poll: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and watch.view.version == last_version and not watch.view.done:
        time.sleep(poll)
