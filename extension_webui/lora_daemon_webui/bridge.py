"""The repository's thin client inside the WebUI (websocket client, launcher, setting declarations),
loaded under a private package name so that the WebUI's `sys.modules` never gets a `shared` or `daemon`
from us: another extension's top-level `shared` keeps working beside ours, in either load order.
shared/host_import.py says how.

The checkout is found from the extension folder: `.lora-daemon-copy` (written by install.py where it had
to copy the extension instead of linking it) names it; otherwise it is the parent of the extension
folder after resolving links. Nothing goes on `sys.path`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parent.parent


def repo_root(extension_dir: Path) -> Path:
    marker = extension_dir / ".lora-daemon-copy"  # written by install.py into a copy: {"repo": checkout}
    return Path(json.loads(marker.read_text(encoding="utf-8"))["repo"]) if marker.is_file() else extension_dir.resolve().parent


REPO_ROOT = repo_root(EXTENSION_DIR)
_spec = importlib.util.spec_from_file_location("_lora_daemon_host_import", REPO_ROOT / "shared" / "host_import.py")
host_import = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_import)
_modules = host_import.thin_modules(REPO_ROOT)
client, launcher, schema = _modules["client"], _modules["launcher"], _modules["schema"]
