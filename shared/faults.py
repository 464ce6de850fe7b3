"""Test-only fault injection: make a named moment of a job slow, or make it fail, on demand.

The reliability suite (tests/reliability/) needs to kill the daemon *during* a checkpoint save or a
deploy, and to see what a job does when a step runs out of memory or the disk fills up. Those moments
last milliseconds, so the suite names them in an environment variable the daemon passes on to its
workers:

    LORA_DAEMON_FAULT="POINT[@PATTERN]=ACTION[;...]"

POINT is one of the places that call `hit()`: `load` (the worker, before the trainer starts; PATTERN
is the job's output name),
`step` (each step's progress report; PATTERN is the step number), `write` (shared/files.py, after a
file's temporary copy is written and before it gets its name; PATTERN is an fnmatch pattern for
"parent-folder/file-name" of the target). ACTION is `sleep:SECONDS`, `oom` (a CUDA-style
out-of-memory RuntimeError), `memoryerror` (Python's MemoryError, what a failed allocation in RAM
raises), `enospc` (OSError "No space left on device") or `exit` (the process dies at once). When
`LORA_DAEMON_FAULT_MARK` names a folder, each fault first writes a file `POINT.<pid>` there, so the
test knows the moment has come and which process to watch; an ACTION ending in `+once` then acts only
in the first process that reaches the point (a retried job runs on past it).

Unset (always, outside tests) this costs one dictionary lookup per call.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import time
from pathlib import Path

FAULT_ENV = "LORA_DAEMON_FAULT"
MARK_ENV = "LORA_DAEMON_FAULT_MARK"


def hit(point: str, subject: object = "") -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for rule in spec.split(";"):
        where, _, action = rule.strip().partition("=")
        name, _, pattern = where.partition("@")
        if name != point or (pattern and not fnmatch.fnmatch(str(subject), pattern)):
            continue
        mark = os.environ.get(MARK_ENV)
        action, once = action.removesuffix("+once"), action.endswith("+once")
        if once and mark and any(p.name.startswith(f"{point}.") and p.name != f"{point}.{os.getpid()}"
                                 for p in Path(mark).iterdir()):
            continue  # another process acted here already
        if mark:
            Path(mark, f"{point}.{os.getpid()}").write_text(f"{subject}\n{action}\n", encoding="utf-8")
        _act(action, point, subject)


def _act(action: str, point: str, subject: object) -> None:
    kind, _, arg = action.partition(":")
    if kind == "sleep":
        time.sleep(float(arg or 60))
    elif kind == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)")
    elif kind == "memoryerror":
        raise MemoryError("injected fault")
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(subject))
    elif kind == "exit":
        os._exit(int(arg or 137))
    else:
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} at {point}")
