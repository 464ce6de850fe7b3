"""Placing a copy of a finished adapter in another folder (a host's Lora folder), under a name not taken yet.

A `.safetensors` LoRA is copied byte for byte with only its header's name fields changed to the new
name (`ss_output_name`, `modelspec.title`: what the hosts show), its sidecars (`.json` notes,
`.preview.png`) beside it; an LLM adapter folder is copied whole. Everything follows shared/files.py:
complete before it has its name, never over an existing file.

The header is rewritten here rather than with the `safetensors` package: that package has no way to
change metadata without loading every tensor (into torch, which the daemon's process must not import,
or numpy, which cannot hold bfloat16), while the format makes it simple: 8 bytes of little-endian header
length, the JSON header (tensor offsets count from the end of the header), then the tensor bytes, which
stay as they are.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from shared.errors import UserError
from shared.files import publish_new, publish_new_folder
from shared.weight_files import safetensors_header

NAME_KEYS = ("ss_output_name", "modelspec.title")


def read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the tensor data) of a .safetensors file; UserError naming it if it is not one."""
    try:
        return safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None


def copy_safetensors(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Write `src` to `dst` with `metadata` merged into its `__metadata__` (tensor bytes unchanged)."""
    header, data_at = read_header(src)
    merged = {**(header.get("__metadata__") or {}), **{k: str(v) for k, v in metadata.items()}}
    header = {"__metadata__": merged, **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # the tensor data starts 8-aligned, as safetensors writes it
    with open(src, "rb") as fh, open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        fh.seek(data_at)
        shutil.copyfileobj(fh, out, 1 << 20)


def renamed(src: Path, name: str) -> dict[str, str]:
    """The name fields of `src`'s metadata set to `name` (only those it has)."""
    header, _ = read_header(src)
    return {key: name for key in NAME_KEYS if key in (header.get("__metadata__") or {})}


def place_copy(src: Path, folder: Path, stem: str,
               sidecars: dict[str, Callable[[Path, str], None]] | None = None) -> Path:
    """A copy of the adapter `src` in `folder` as `stem` (or `stem_2`, ... when taken). A file's
    sidecars default to the `.preview.png` and `.json` beside it; `sidecars` (suffix -> writer(path,
    name)) replaces them."""
    src = Path(src)
    if src.is_dir():
        return publish_new_folder(folder, stem, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    if sidecars is None:
        sidecars = {suffix: copier(beside) for suffix in (".preview.png", ".json")
                    if (beside := src.with_name(src.stem + suffix)).is_file()}
    return publish_new(folder, stem, ".safetensors", lambda path, name: copy_safetensors(src, path, renamed(src, name)),
                       sidecars)


def copier(source: Path) -> Callable[[Path, str], None]:
    """A sidecar writer that copies `source`."""
    return lambda path, name: shutil.copyfile(source, path)
