"""Import the repository's thin client (`shared.client`, `shared.launcher`) from inside the WebUI.

The extension folder is a symbolic link from the WebUI's `extensions/` into this repository, so the
repository root is found from this file's real path. The WebUI's own code lives in the `modules`
package (AUTOMATIC1111 and Forge import `modules.shared`, never a top-level `shared`), so our top-level
`shared` package does not clash with it. Another extension could still have put a different top-level
`shared` into `sys.modules`; then ours is imported beside it and the other one is put back untouched.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
OUR_PACKAGE = REPO_ROOT / "shared"


def _is_ours(module: ModuleType | None) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and Path(path).resolve().parent == OUR_PACKAGE


def _shared_keys() -> list[str]:
    return [k for k in sys.modules if k == "shared" or k.startswith("shared.")]


def load_client_modules(names: tuple[str, ...] = ("client", "launcher")) -> dict[str, ModuleType]:
    """Return {name: module} for `shared.<name>` from this repository, whatever else is loaded."""
    if not (OUR_PACKAGE / "client.py").is_file():
        raise ImportError(f"{OUR_PACKAGE / 'client.py'} not found: link extension_webui from a whole "
                          "lora-daemon checkout into the WebUI's extensions folder (see docs/webui.md)")
    if _is_ours(sys.modules.get("shared")):
        return {name: importlib.import_module(f"shared.{name}") for name in names}
    foreign = {k: sys.modules.pop(k) for k in _shared_keys()}
    sys.path.insert(0, str(REPO_ROOT))  # only for this import: the repo root holds other top-level names
    try:
        modules = {name: importlib.import_module(f"shared.{name}") for name in names}
    finally:
        sys.path.remove(str(REPO_ROOT))
        if foreign:  # ours stay reachable through the returned modules; the other one gets its name back
            for key in _shared_keys():
                del sys.modules[key]
            sys.modules.update(foreign)
    return modules
