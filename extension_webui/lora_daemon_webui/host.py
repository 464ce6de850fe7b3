"""Everything the tab asks of the WebUI (AUTOMATIC1111 v1.10 or Forge), in one place.

`modules.*` is imported inside each function: the rest of this package runs (and is tested) outside
a WebUI. Nothing here reads `shared.sd_model`, which would load a checkpoint just to look at it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

SECTION = ("lora_daemon", "LoRA daemon")

# (key, default, label, explanation shown under the setting)
OPTIONS = (
    ("lora_daemon_state_dir", "", "Daemon state folder",
     "Where the daemon keeps its token and daemon.json; empty: $LORA_DAEMON_HOME or ~/.local/state/lora-daemon"),
    ("lora_daemon_address", "", "Daemon address (host:port)",
     "Empty: the address the daemon wrote into its state folder (default 127.0.0.1:7861)"),
    ("lora_daemon_autostart", True, "Start the daemon automatically when Train finds none running", ""),
    ("lora_daemon_python", "", "Python of the daemon's environment (for starting it)",
     "Empty: $LORA_DAEMON_PYTHON, else the one install.py recorded"),
    ("lora_daemon_free_vram", False, "Free VRAM while training (unload the checkpoint; it comes back after)", ""),
    ("lora_daemon_deploy_dir", "", "Lora folder the finished LoRA is copied to",
     "Empty: the WebUI's Lora folder (--lora-dir, default models/Lora)"),
    ("lora_daemon_allow_remote", False,
     "Allow training from other machines without a WebUI login (--listen/--share without --gradio-auth)",
     "Off: the tab only trains when the WebUI is local or asks for a login"),
)


def register_settings() -> None:
    from modules import shared

    for key, default, label, explanation in OPTIONS:
        option = shared.OptionInfo(default, label, section=SECTION)
        if explanation and hasattr(option, "info"):
            option = option.info(explanation)
        shared.opts.add_option(key, option)


@dataclass
class TabSettings:
    state_dir: Path | None
    host: str | None
    port: int | None
    autostart: bool
    python: str | None
    free_vram: bool
    deploy_dir: str
    allow_remote: bool


class SettingsError(ValueError):
    pass


def _opt(key: str, default):
    from modules import shared

    value = getattr(shared.opts, key, default)
    return default if value is None else value


def parse_address(text: str) -> tuple[str | None, int | None]:
    text = (text or "").strip()
    if not text:
        return None, None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"Settings > LoRA daemon > Daemon address: {text!r} is not host:port "
                            "(e.g. 127.0.0.1:7861); leave it empty to use the state folder's daemon.json")
    return host.strip("[]"), int(port)


def default_lora_dir() -> str:
    from modules import paths, shared

    lora_dir = getattr(shared.cmd_opts, "lora_dir", None)
    return str(lora_dir or os.path.join(paths.models_path, "Lora"))


def read_settings() -> TabSettings:
    host, port = parse_address(str(_opt("lora_daemon_address", "")))
    state = str(_opt("lora_daemon_state_dir", "")).strip()
    python = str(_opt("lora_daemon_python", "")).strip()
    return TabSettings(
        state_dir=Path(state).expanduser() if state else None,
        host=host,
        port=port,
        autostart=bool(_opt("lora_daemon_autostart", True)),
        python=python or None,
        free_vram=bool(_opt("lora_daemon_free_vram", False)),
        deploy_dir=str(_opt("lora_daemon_deploy_dir", "")).strip() or default_lora_dir(),
        allow_remote=bool(_opt("lora_daemon_allow_remote", False)),
    )


def base_dir() -> Path:
    """Relative dataset paths are read from the WebUI's folder, as a WebUI user expects."""
    from modules import paths

    return Path(getattr(paths, "script_path", None) or os.getcwd())


def exposed_without_login() -> bool:
    """True when the WebUI listens beyond this machine and asks no login: then a stranger could press
    Train, so the tab refuses unless the user allowed it in the settings."""
    from modules import shared

    cmd = shared.cmd_opts
    name = getattr(cmd, "server_name", None)
    exposed = bool(getattr(cmd, "listen", False) or getattr(cmd, "share", False) or getattr(cmd, "ngrok", None)
                   or (name and name not in ("127.0.0.1", "localhost", "::1")))
    login = bool(getattr(cmd, "gradio_auth", None) or getattr(cmd, "gradio_auth_path", None))
    return exposed and not login


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_titles() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoints_list)


def default_checkpoint() -> str | None:
    """The title of the checkpoint the WebUI uses (no model is loaded to find it)."""
    from modules import sd_models

    try:
        return sd_models.select_checkpoint().title
    except Exception:  # FileNotFoundError when there are none
        return None


def checkpoint_path(value: str | None) -> str | None:
    """A dropdown title becomes its file; anything else typed into the box is taken as a path."""
    from modules import sd_models

    if not value:
        return None
    info = sd_models.checkpoints_list.get(value)
    return info.filename if info is not None else value.strip()


# --- VRAM ----------------------------------------------------------------------------------------


def _is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def free_vram() -> bool:
    """Move the loaded checkpoint off the GPU under the queue lock; False when none was loaded."""
    from modules import call_queue, sd_models

    with call_queue.queue_lock:
        model = sd_models.model_data.sd_model
        if model is None and not _is_forge():
            return False
        sd_models.unload_model_weights(model)  # A1111: to the CPU; Forge: unloads everything
    return True


def restore_vram() -> None:
    """Bring the checkpoint back to the GPU (A1111). Forge loads it again on the next generation."""
    from modules import call_queue, sd_models

    if _is_forge() or not hasattr(sd_models, "send_model_to_device"):
        return
    with call_queue.queue_lock:
        model = sd_models.model_data.sd_model
        if model is not None:
            sd_models.send_model_to_device(model)


def refresh_loras() -> bool:
    """Let the WebUI's Lora list (extra networks) see the new file. False when Lora support is absent."""
    try:
        import networks  # the built-in Lora extension's module, in sys.modules once it has loaded
    except ImportError:
        return False
    networks.list_available_networks()
    return True
