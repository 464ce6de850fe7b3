"""The reliability suite's shared parts: counts that longer local runs can raise, a folder scanner that
finds partial files, and the figures every test records for docs/reliability.md.

Figures go to `tests/reliability/last_run.json` when `RELIABILITY_RECORD=1` (so an ordinary test run
leaves the committed file alone); `python tests/reliability/report.py` renders them as Markdown.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "last_run.json"
_figures: dict[str, dict] = {}
_started = time.time()


def count(name: str, default: int) -> int:
    """A count the suite uses, e.g. RELIABILITY_CRASH_ROUNDS=100 for a longer run."""
    return int(os.environ.get(f"RELIABILITY_{name}", default))


@pytest.fixture
def record():
    """record(section, **figures): keep this test's figures for the report (merged per section)."""

    def put(section: str, **values) -> None:
        _figures.setdefault(section, {}).update(values)

    return put


def pytest_sessionfinish(session, exitstatus):
    if not _figures or os.environ.get("RELIABILITY_RECORD") != "1":
        return
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    sections = {**previous.get("sections", {}), **_figures}
    RESULTS.write_text(json.dumps({
        "run_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "duration_s": round(time.time() - _started, 1),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "exit_status": int(exitstatus),
        "sections": sections,
    }, indent=1) + "\n")


# --- scanning output and deploy folders -----------------------------------------------------------

def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith((".tmp", ".old"))


def scan_folder(folder: Path) -> dict:
    """Every *.safetensors under `folder` must open and hold readable tensors; count what is there."""
    from safetensors import safe_open

    seen = {"files": 0, "partial": [], "hidden_temporaries": [], "visible_temporaries": [], "orphan_sidecars": []}
    if not folder.exists():
        return seen
    for path in sorted(folder.rglob("*")):
        if any(is_temporary(p) for p in [path, *path.relative_to(folder).parents] if p.name):
            if is_temporary(path):
                seen["hidden_temporaries"].append(str(path))
            continue
        if path.name.endswith((".tmp", ".part", ".partial")):
            seen["visible_temporaries"].append(str(path))
        for sidecar in (".json", ".preview.png"):  # a LoRA's notes or preview without the LoRA itself
            if path.name.endswith(sidecar) and path.name != "report.json" and path.parent.name != "checkpoints" and not path.parent.name.startswith(
                    "state-step"):
                stem = path.name[: -len(sidecar)]
                if not (path.parent / f"{stem}.safetensors").exists() and not (path.parent / stem).is_dir():
                    seen["orphan_sidecars"].append(str(path))
        if path.suffix != ".safetensors" or not path.is_file():
            continue
        seen["files"] += 1
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
                if not keys:
                    raise ValueError("no tensors")
                for key in keys:
                    fh.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - any reader error means a partial or broken file
            seen["partial"].append(f"{path}: {type(exc).__name__}: {exc}")
    return seen
