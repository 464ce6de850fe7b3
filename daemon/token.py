"""The per-install token: a random secret in a file only this user can read.

Local clients read the file and send the token in a header; a web page cannot read it, so a browser
that reaches the port (websockets get no CORS) still cannot drive the daemon.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import sys
from pathlib import Path


def ensure_token(path: Path) -> str:
    """Return the token in `path`, creating it (mode 0600) on first use; tighten loose permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            print(f"warning: {path} was readable by others (mode {mode:o}); set to 0600", file=sys.stderr)
            path.chmod(0o600)
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 32:
            return token
        path.unlink()  # empty or truncated (a crash while it was created): make a new one
        return ensure_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def token_matches(sent: str | None, token: str) -> bool:
    if not sent:
        return False
    return hmac.compare_digest(sent.encode("utf-8"), token.encode("utf-8"))
