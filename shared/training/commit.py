"""A job's outputs, committed exactly once whatever is killed when.

At its end a run publishes the adapter into `output_dir`, `deploy_dir` and the daemon client's Lora
folders, and a task may add exports (an LLM's merged model), each under a name not taken yet
(`name_2`, ...). When a daemon job is killed between two of these, or after all of them but before
the daemon recorded its result, the daemon runs the job again; that re-run must not publish second
copies beside the first. So a daemon job keeps a journal, `publish.json` in its job folder:

- every `publish_new` / `publish_new_folder` call inside `shared.files.journaled(journal)` records
  the name it chose before it writes, the hashes of the files it is about to link, and when it is
  done (shared/files.py); the re-run's call for the same output finds that record and completes the
  name the earlier attempt began (or returns what it finished) instead of taking a new one;
- when everything is published the journal records the run's result: a re-run of the same job then
  returns it at once, loading and training nothing.

A journal is only read by a re-run of the same job (every setting but `resume`, and the same deploy
folders); any other run starts a new one. A run outside the daemon (`train`) keeps none: running a
config again is a new run and publishes new copies (`name_2`), as it always has.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.files import atomic_write
from shared.reporting import TrainResult


def run_id(cfg, deploy_dirs) -> str:
    """What makes two runs the same job: every setting but `resume`, and where the copies go."""
    settings = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
    what = {"config": settings, "deploy_dirs": sorted(str(Path(d).resolve()) for d in deploy_dirs)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """The names a run's outputs took and whether each is complete; see the module docstring."""

    def __init__(self, path: Path, run: str, entries: dict | None = None, result: dict | None = None):
        self.path, self.run = Path(path), run
        self.entries: dict[str, dict] = entries or {}
        self.result = result

    @classmethod
    def open(cls, path: Path, cfg, deploy_dirs=(), *, rerun: bool) -> Journal:
        """The journal at `path`: the earlier attempt's when this run re-runs the same job, else a new
        one (an older journal there is removed, so a later re-run cannot take it for this run's)."""
        path, run = Path(path), run_id(cfg, deploy_dirs)
        if rerun and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if data.get("run") == run:
                return cls(path, run, data.get("entries"), data.get("result"))
        path.unlink(missing_ok=True)
        return cls(path, run)

    def finished(self) -> TrainResult | None:
        """The result an earlier attempt of this job published completely, or None."""
        return TrainResult.from_json(self.result) if self.result else None

    # --- what shared/files.py asks ---------------------------------------------------------------
    def entry(self, key: str) -> dict | None:
        return self.entries.get(key)

    def record(self, key: str, **fields) -> None:
        """Note what an output is about to do or did, on disk before the next step of the write."""
        self.entries.setdefault(key, {}).update(fields)
        self._save()

    # --- the end ---------------------------------------------------------------------------------
    def complete(self, result: TrainResult) -> None:
        """Everything is published (also what a stop saved: the job ended there)."""
        self.result = result.to_json()
        self._save()

    def _save(self) -> None:
        text = json.dumps({"run": self.run, "entries": self.entries, "result": self.result}, indent=1)
        atomic_write(self.path, lambda p: Path(p).write_text(text, encoding="utf-8"))
