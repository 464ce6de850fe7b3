"""Do not train twice for the same workflow: a key from everything that shapes the LoRA, and a small
JSON file mapping each key to the file that training produced.

The key covers the training settings, the checkpoint's identity (path, size, modification time) and
the data set's contents (every file's relative name, size and modification time). Hashing the bytes
would notice a file rewritten with the same size and time, but would read gigabytes of checkpoint on
every queued prompt: ComfyUI calls IS_CHANGED each time a workflow is queued.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from .thin import client

CACHE_FILE = "comfyui_train_cache.json"
_lock = threading.Lock()


def file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def dataset_listing(folder: Path) -> list[list]:
    """Every file under the data set folder (sorted relative names, sizes, modification times)."""
    listing = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            st = path.stat()
            listing.append([path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    return listing


def cache_key(settings: dict, checkpoint: Path, dataset: Path, model_files: dict[str, Path] | None = None) -> str:
    """sha256 over the settings (JSON, sorted keys), the checkpoint identity, the other model files'
    (Flux's ae, CLIP-L, T5) and the data set listing."""
    payload = {
        "settings": settings,
        "checkpoint": file_identity(checkpoint),
        "dataset": [str(dataset), dataset_listing(dataset)],
    }
    if model_files:
        payload["model_files"] = {key: file_identity(path) for key, path in model_files.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TrainCache:
    """key -> {"lora_name", "path", "job", "generation"} in `<daemon state folder>/comfyui_train_cache.json`."""

    def __init__(self, state_dir: Path | None = None):
        self.path = Path(state_dir or client.default_state_dir()) / CACHE_FILE

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def lookup(self, key: str) -> dict | None:
        """The cached result for `key` if its file is still there."""
        entry = self._read().get(key)
        if isinstance(entry, dict) and entry.get("path") and Path(entry["path"]).is_file():
            return entry
        return None

    def generation(self, key: str) -> int:
        """How often the LoRA for `key` has been trained again because its file was deleted: the part of
        the node's IS_CHANGED value that moves. It stays the same from before the first training to
        after it (so the second queue of an unchanged workflow is a cache hit in ComfyUI too) and
        moves once when the file is gone, so that queue trains it again."""
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return 0
        generation = int(entry.get("generation") or 0)
        return generation if entry.get("path") and Path(entry["path"]).is_file() else generation + 1

    def store(self, key: str, entry: dict) -> None:
        with _lock:
            data = self._read()
            data[key] = entry
            # written beside, then renamed: a reader never sees half a file (the pack loads only the thin
            # client, so shared/files.py is not here)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
