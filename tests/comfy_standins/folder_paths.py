"""Stand-in for ComfyUI's folder_paths: named model folders, each a list of paths and extensions."""

from __future__ import annotations

import os

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
base_path = os.getcwd()
models_dir = os.path.join(base_path, "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def configure(base: str) -> None:
    """Test helper: a ComfyUI folder at `base` with models/checkpoints and models/loras."""
    global base_path, models_dir
    base_path = base
    models_dir = os.path.join(base, "models")
    folder_names_and_paths.clear()
    for name in ("checkpoints", "loras"):
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], set(supported_pt_extensions))
        os.makedirs(os.path.join(models_dir, name), exist_ok=True)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    """Every file with a known extension under the folder's paths, relative, sorted."""
    folders, extensions = folder_names_and_paths[folder_name]
    found = set()
    for folder in folders:
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if os.path.splitext(name)[1].lower() in extensions:
                    found.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")  # no escaping the folder with ../
    for folder in folder_names_and_paths[folder_name][0]:
        full = os.path.join(folder, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full
