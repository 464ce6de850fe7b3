"""lora-daemon's ComfyUI node pack: "Train LoRA" (backed by the trainer daemon), "LoRA job status" and
"Auto-label dataset".

Install by linking this folder into ComfyUI's `custom_nodes/` (see docs/comfyui.md). ComfyUI loads it
by file location under a module name made from its path, so the package cannot rely on the repo
being importable. It needs the repo's `shared` package (the thin daemon client), found here:

- the repo root is the parent of this folder *after resolving links*, so a symlink in
  `custom_nodes/` still finds it;
- the root goes on `sys.path` only while `shared.client` and `shared.launcher` are imported, and is
  taken off again: the repo's other top-level names (`daemon`, `tests`, `docs`, `install`) must never
  shadow ComfyUI's own modules or another pack's. Once imported, `shared` lives in `sys.modules` and
  its submodules are found through `shared.__path__`, not `sys.path`;
- `shared` is a generic name: if some other package already took it, the pack refuses to load with a
  message naming both folders rather than use the wrong code.

Nothing heavier than the standard library, `websockets` and our thin client is imported here: ComfyUI
has torch, but the daemon's own dependencies (diffusers, peft, ...) live in the daemon's environment.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _import_thin_client() -> None:
    existing = sys.modules.get("shared")
    if existing is not None:
        where = Path(getattr(existing, "__file__", "") or "").resolve().parent
        if where != REPO_ROOT / "shared":
            raise ImportError(
                f"lora-daemon nodes: another package named 'shared' is already loaded from {where}; "
                f"this pack needs the one in {REPO_ROOT / 'shared'} (rename or remove the other one)"
            )
    root = str(REPO_ROOT)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        importlib.import_module("shared.client")
        importlib.import_module("shared.launcher")
    finally:
        if added:
            sys.path.remove(root)


_import_thin_client()

from .label_node import AutoLabelDataset  # noqa: E402
from .status_node import LoraJobStatus  # noqa: E402
from .train_node import TrainLora  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "LoraDaemonTrainLoRA": TrainLora,
    "LoraDaemonJobStatus": LoraJobStatus,
    "LoraDaemonAutoLabel": AutoLabelDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraDaemonTrainLoRA": "Train LoRA (lora-daemon)",
    "LoraDaemonJobStatus": "LoRA job status (lora-daemon)",
    "LoraDaemonAutoLabel": "Auto-label dataset (lora-daemon)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
