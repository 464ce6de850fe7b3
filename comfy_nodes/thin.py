"""The repository's thin client (websocket client, launcher, protocol tables, setting declarations),
loaded under a private package name so that ComfyUI's `sys.modules` never gets a `shared` or `daemon`
from us: another pack's top-level `shared` keeps working beside ours, whichever ComfyUI loads first
(it loads packs in `os.listdir` order). shared/host_import.py says how.

The checkout is found from this folder: `.lora-daemon-copy` (written by install.py where it had to copy
the pack instead of linking it) names it; otherwise it is the parent of this folder after resolving
links. Nothing goes on `sys.path`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def repo_root(pack_dir: Path) -> Path:
    marker = pack_dir / ".lora-daemon-copy"  # written by install.py into a copy: {"repo": checkout}
    return Path(json.loads(marker.read_text(encoding="utf-8"))["repo"]) if marker.is_file() else pack_dir.resolve().parent


REPO_ROOT = repo_root(Path(__file__).parent)
_spec = importlib.util.spec_from_file_location("_lora_daemon_host_import", REPO_ROOT / "shared" / "host_import.py")
host_import = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_import)
_modules = host_import.thin_modules(REPO_ROOT)
client, launcher, protocol, schema = _modules["client"], _modules["launcher"], _modules["protocol"], _modules["schema"]
