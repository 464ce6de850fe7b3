"""ComfyUI's own modules, imported when a node runs rather than when the pack loads.

Keeping these imports lazy lets the pack (and its tests) load in a Python where ComfyUI's modules, or
torch, are absent; inside ComfyUI they are always there.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("lora_daemon.comfy")


def folder_paths():
    import folder_paths as module

    return module


def checkpoint_names() -> list[str]:
    return folder_paths().get_filename_list("checkpoints")


def checkpoint_path(name: str) -> Path:
    full = folder_paths().get_full_path("checkpoints", name)
    if not full:
        raise FileNotFoundError(f"checkpoint {name!r} is not in ComfyUI's checkpoints folders; "
                                "pick one from the list (refresh with R)")
    return Path(full).resolve()


# ComfyUI's folder names for each kind of model file, newest first: ComfyUI since mid 2024 names them
# diffusion_models and text_encoders (and maps the old unet and clip onto them); older ones only know
# the old names. The kinds are the setting declarations' host widgets (shared/schema).
MODEL_FOLDERS = {"diffusion_model": ("diffusion_models", "unet"), "vae": ("vae",),
                 "text_encoder": ("text_encoders", "clip"), "checkpoint": ("checkpoints",)}


def model_folder(kind: str) -> str:
    """The folder_paths name this ComfyUI has for a kind of model file."""
    known = folder_paths().folder_names_and_paths
    for name in MODEL_FOLDERS[kind]:
        if name in known:
            return name
    return MODEL_FOLDERS[kind][-1]


def model_names(kind: str) -> list[str]:
    return folder_paths().get_filename_list(model_folder(kind))


def model_path(kind: str, name: str, field: str) -> Path:
    """The file `name` of ComfyUI's folder for `kind`; the error names the node's input `field`."""
    folder = model_folder(kind)
    full = folder_paths().get_full_path(folder, name) if name else None
    if not full:
        raise FileNotFoundError(f"{field}: {name!r} is not in ComfyUI's {folder} folders "
                                f"({', '.join(folder_paths().get_folder_paths(folder))}); pick one from the list "
                                "(refresh with R)")
    return Path(full).resolve()


def first_lora_folder() -> Path:
    folders = folder_paths().get_folder_paths("loras")
    if not folders:
        raise FileNotFoundError("ComfyUI has no loras folder configured (folder_paths 'loras')")
    return Path(folders[0]).resolve()


def base_path() -> Path:
    """ComfyUI's own folder: relative paths typed into the node are read relative to it."""
    return Path(getattr(folder_paths(), "base_path", ".")).resolve()


def free_vram() -> None:
    """Unload ComfyUI's models so the daemon's trainer has the GPU memory."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def raise_if_interrupted() -> None:
    """Raises comfy.model_management.InterruptProcessingException when the user pressed cancel."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    import comfy.model_management as mm

    return isinstance(exc, mm.InterruptProcessingException)


def progress_bar(total: int, node_id: str | None):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def send_event(event: str, data: dict) -> None:
    """A custom event for front-end extensions; nothing depends on it, so a missing server is fine."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


def progress_text(text: str, node_id: str | None) -> None:
    """Text on the node itself (`PromptServer.send_progress_text`, ComfyUI 0.3.6x and later). Older
    ComfyUI has no such call: the node then shows only its progress bar."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    send = getattr(getattr(PromptServer, "instance", None), "send_progress_text", None)
    if send is not None:
        send(text, node_id)


def apply_lora(model, clip, path: Path, strength_model: float, strength_clip: float):
    """The new LoRA on the connected MODEL/CLIP, the way ComfyUI's own LoraLoader applies one."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
