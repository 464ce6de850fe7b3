"""Stand-in for ComfyUI's folder_paths: named model folders, each a list of paths and extensions."""

from __future__ import annotations

import os

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
base_path = os.getcwd()
models_dir = os.path.join(base_path, "models")
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


# ComfyUI's model folders: a name and its folders under models/ (diffusion_models and text_encoders also
# read the older unet and clip folders, as ComfyUI does since it renamed them)
MODEL_FOLDERS = {"checkpoints": ("checkpoints",), "loras": ("loras",), "vae": ("vae",),
                 "diffusion_models": ("unet", "diffusion_models"), "text_encoders": ("text_encoders", "clip")}


def configure(base: str, legacy: bool = False) -> None:
    """Test helper: a ComfyUI folder at `base` with its model folders. `legacy`: an older ComfyUI that
    knows only `unet` and `clip` (no diffusion_models, no text_encoders)."""
    global base_path, models_dir
    base_path = base
    models_dir = os.path.join(base, "models")
    folder_names_and_paths.clear()
    folders = dict(MODEL_FOLDERS)
    if legacy:
        del folders["diffusion_models"], folders["text_encoders"]
        folders.update(unet=("unet",), clip=("clip",))
    for name, subfolders in folders.items():
        paths = [os.path.join(models_dir, sub) for sub in subfolders]
        folder_names_and_paths[name] = (paths, set(supported_pt_extensions))
        for path in paths:
            os.makedirs(path, exist_ok=True)


def map_legacy(folder_name: str) -> str:
    """The folder an old name means (ComfyUI's own mapping; an older ComfyUI has no such function)."""
    if "diffusion_models" not in folder_names_and_paths:
        return folder_name
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    """Every file with a known extension under the folder's paths, relative, sorted."""
    folders, extensions = folder_names_and_paths[map_legacy(folder_name)]
    found = set()
    for folder in folders:
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if os.path.splitext(name)[1].lower() in extensions:
                    found.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    folder_name = map_legacy(folder_name)
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
