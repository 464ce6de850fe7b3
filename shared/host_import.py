"""Load the thin client inside a host (AUTOMATIC1111/Forge, ComfyUI) under a private package name.

A host's Python is shared with every other extension and node pack, and generic names collide there:
some public ComfyUI packs ship their own top-level `shared/` package and put their folder on
`sys.path`. So the hosts never import `shared` (or `daemon`) from us. This module (standard library
only, loaded by its file path) makes a package named `_lora_daemon_<8 hex digits of the checkout's
path>` whose files are this checkout's `shared/` folder, and imports the thin modules from it: the
websocket client, the launcher, the protocol tables and the setting declarations. They import one
another relatively, so they work under either name, and nothing else from `shared/` (torch, PyYAML,
the trainers) is ever imported in a host. A test walks their imports to keep it so.

    host_import = <this file, loaded by path>
    thin = host_import.thin_modules(repo_root)   # {"client": module, "launcher": ..., "schema": ...}
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

THIN_MODULES = ("errors", "protocol", "client", "launcher", "schema")


def package_name(repo_root: Path) -> str:
    """The private name for one checkout's `shared/` (two checkouts in one host never share modules)."""
    return "_lora_daemon_" + hashlib.sha256(str(Path(repo_root).resolve()).encode()).hexdigest()[:8]


def thin_package(repo_root: Path) -> ModuleType:
    """The checkout's `shared/` as a package under its private name (created once per process)."""
    name = package_name(repo_root)
    if name in sys.modules:
        return sys.modules[name]
    folder = Path(repo_root).resolve() / "shared"
    if not (folder / "client.py").is_file():
        raise ImportError(f"{folder / 'client.py'} not found: the extension must be linked (or installed with "
                          "python install.py) from a whole lora-daemon checkout")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


def thin_modules(repo_root: Path) -> dict[str, ModuleType]:
    """{name: module} for every thin module of the checkout, imported under its private package."""
    package = thin_package(repo_root)
    return {name: importlib.import_module(f"{package.__name__}.{name}") for name in THIN_MODULES}
