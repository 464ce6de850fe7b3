"""A stand-in ComfyUI host for the node pack: the stand-in modules on sys.path, a ComfyUI folder with
its model folders (checkpoints, loras, vae, diffusion_models/unet, text_encoders/clip), the progress
hook ComfyUI's main.py installs, and the pack loaded from a link in custom_nodes/ the way ComfyUI's
nodes.load_custom_node loads it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDINS = Path(__file__).resolve().parent / "comfy_standins"
HOST_MODULES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.sd", "server")


class ComfyHost:
    def __init__(self, base: Path, pack: Path | None = None):
        self.base = base
        self.pack_dir = pack  # an installed pack to load; default: a link to this checkout's comfy_nodes
        self.progress: list[tuple[int, int, str | None]] = []  # (value, total, node_id) per update
        self.progress_seen = threading.Event()

    def install(self) -> ComfyHost:
        self._forget_modules()
        sys.path.insert(0, str(STANDINS))
        self.folder_paths = importlib.import_module("folder_paths")
        self.utils = importlib.import_module("comfy.utils")
        self.mm = importlib.import_module("comfy.model_management")
        self.sd = importlib.import_module("comfy.sd")
        self.server = importlib.import_module("server").PromptServer()
        self.folder_paths.configure(str(self.base))
        self.checkpoints = Path(self.folder_paths.get_folder_paths("checkpoints")[0])
        self.loras = Path(self.folder_paths.get_folder_paths("loras")[0])
        self.models = Path(self.base) / "models"  # diffusion_models, unet, vae, text_encoders, clip inside

        def hook(value, total, preview, prompt_id=None, node_id=None):
            # main.py's hook checks the cancel flag on every progress update, then reports the update
            self.mm.throw_exception_if_processing_interrupted()
            self.progress.append((value, total, node_id))
            self.progress_seen.set()

        self.utils.set_progress_bar_global_hook(hook)
        if self.pack_dir is None:
            custom_nodes = self.base / "custom_nodes"
            custom_nodes.mkdir(exist_ok=True)
            self.pack_dir = custom_nodes / "lora_daemon"
            self.pack_dir.symlink_to(REPO / "comfy_nodes", target_is_directory=True)
        self.pack = load_like_comfyui(self.pack_dir)
        return self

    def uninstall(self) -> None:
        self._forget_modules()
        if str(STANDINS) in sys.path:
            sys.path.remove(str(STANDINS))

    def _forget_modules(self) -> None:
        for name in list(sys.modules):
            if name in HOST_MODULES or name.startswith(pack_module_name(self.base / "custom_nodes")):
                del sys.modules[name]


def pack_module_name(module_path: Path) -> str:
    return str(module_path).replace(".", "_x_")


def load_like_comfyui(module_path: Path):
    """nodes.load_custom_node: a module named after the folder's path, loaded from its __init__.py."""
    name = pack_module_name(module_path)
    spec = importlib.util.spec_from_file_location(name, module_path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
