"""The folders a daemon's jobs may read and write, and the check every job path passes first.

A path is resolved (links followed, `..` removed) and must then lie under one of its roots. Nothing
else about it is looked at before this check: not whether it exists, not what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Roots:
    read: list[Path] = field(default_factory=list)
    write: list[Path] = field(default_factory=list)


def confine(path: Path, roots: list[Path], key: str, kind: str) -> str | None:
    """None when `path` (resolved, links followed) lies under one of `roots`; else the error text."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a name too long
        return f"{key}: {path} cannot be resolved ({type(exc).__name__}); give a plain path inside the allowed folders"
    if any(resolved.is_relative_to(root) for root in roots):
        return None
    listed = ", ".join(str(r) for r in roots) or "(none)"
    setting = "read_roots" if kind == "read" else "write_roots"
    return (
        f"{key}: {resolved} is outside the folders this daemon may {kind} ({listed}); "
        f"add a folder to {setting} in the daemon's config.yaml or use a folder inside one"
    )
