"""Everything the tab asks of the WebUI (AUTOMATIC1111 v1.10 or Forge), in one place.

`modules.*` is imported inside each function: the rest of this package runs (and is tested) outside
a WebUI. Nothing here reads `shared.sd_model`, which would load a checkpoint just to look at it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lora_daemon.webui")

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


# A checkpoint's title is `name.safetensors` until the WebUI hashes it (when it first loads it), then
# `name.safetensors [hash]`: a title the page got earlier goes stale. So a title is always looked up
# the way the WebUI itself does (`get_closet_checkpoint_match`: its aliases, then the closest title),
# never rebuilt into a path, and the dropdown is refilled with the current titles on every page load.


class CheckpointNotFound(ValueError):
    pass


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


def _match(value: str):
    from modules import sd_models

    return sd_models.get_closet_checkpoint_match(value.strip())


def checkpoint_title(value: str | None) -> str | None:
    """The current title of the checkpoint `value` names (an old title included), else `value`."""
    if not value:
        return value
    info = _match(value)
    return info.title if info is not None else value


def checkpoint_path(value: str | None) -> str | None:
    """The file of the checkpoint a title names, as the WebUI finds it; a typed absolute path (or
    `~/...`) is taken as is. Raises CheckpointNotFound for anything else: a name the WebUI does not
    know must not become a path relative to the WebUI folder."""
    if not value or not value.strip():
        return None
    info = _match(value)
    if info is not None:
        return info.filename
    path = Path(value.strip()).expanduser()
    if path.is_absolute():
        return str(path)
    raise CheckpointNotFound(f"Base model: {value.strip()!r} is not one of the WebUI's checkpoints; press "
                             "Reload list and pick one, or enter the full path of a model file")


# --- VAE and text-encoder files (Flux's ae, CLIP-L, T5) -------------------------------------------

# The WebUI's folder for each kind of module file (the setting declarations' host widgets), and the
# command-line option that adds one more: Forge lists models/VAE and models/text_encoder (with --vae-dir
# and --text-encoder-dir) in its "VAE / Text Encoder" menu, A1111 models/VAE for its VAE menu.
MODULE_FOLDERS = {"vae": ("VAE", "vae_dir"), "text_encoder": ("text_encoder", "text_encoder_dir")}
MODULE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


class ModuleNotFound(ValueError):
    pass


def module_files(kind: str) -> dict[str, str]:
    """{name: file} of the WebUI's folder(s) for `kind` (vae, text_encoder): names relative to the folder,
    as Forge lists them."""
    from modules import paths, shared

    folder, option = MODULE_FOLDERS[kind]
    roots = [os.path.join(paths.models_path, folder)]
    extra = getattr(shared.cmd_opts, option, None)
    roots += [extra] if isinstance(extra, str) and extra else []
    found: dict[str, str] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for name in sorted(files):
                if name.lower().endswith(MODULE_SUFFIXES):
                    full = os.path.join(dirpath, name)
                    found.setdefault(Path(os.path.relpath(full, root)).as_posix(), full)
    return dict(sorted(found.items()))


def module_path(kind: str, value: str | None, label: str) -> str | None:
    """The file a module name from the list means; a typed absolute path is taken as is; empty: None.
    `label` names the tab's field in the error."""
    if not value or not value.strip():
        return None
    files = module_files(kind)
    if value.strip() in files:
        return files[value.strip()]
    path = Path(value.strip()).expanduser()
    if path.is_absolute():
        return str(path)
    raise ModuleNotFound(f"{label}: {value.strip()!r} is not in the WebUI's models/{MODULE_FOLDERS[kind][0]} folder; "
                         "press Reload list and pick one, or enter the full path of the file")


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
    """Let the WebUI see the new file: its Lora list (what the API lists) and the Lora cards of the
    extra-networks pages. False when Lora support is absent."""
    try:
        import networks  # the built-in Lora extension's module, in sys.modules once it has loaded
    except ImportError:
        return False
    networks.list_available_networks()
    refresh_extra_network_cards()
    return True


# The extra-networks UI (modules/ui_extra_networks.py, A1111 1.10 and Forge) renders each tab's cards
# once, caches the HTML (`ui.pages_contents`) and hands every later page load that cache; only its
# hidden refresh button (`txt2img_lora_extra_refresh_internal`, `txt2img_extra_refresh` before 1.8)
# builds it again. So the WebUI's own handler of that button is run here, as a press would: pages
# loaded from now on get the new card. A page that is open gets it from
# javascript/lora_daemon_cards.js, which presses the same button in the browser when the tab shows a
# finished LoRA.
_REFRESH_BUTTON = re.compile(r"^(txt2img|img2img)_(lora_extra_refresh_internal|extra_refresh)$")


def refresh_extra_network_cards() -> list[str]:
    """Run the extra-networks refresh handler of each generation tab; returns the button ids run."""
    from modules import shared

    demo = getattr(shared, "demo", None)
    done: list[str] = []
    for elem_id, fn in _refresh_handlers(demo):
        tab = elem_id.split("_", 1)[0]
        if any(d.startswith(f"{tab}_") for d in done):
            continue  # one handler re-renders every page of its tab
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the WebUI's own code: its failure is not the job's
            log.warning("lora-daemon: refreshing the %s Lora cards failed: %s", tab, exc)
            continue
        done.append(elem_id)
    if demo is not None and not done:
        log.info("lora-daemon: no extra-networks refresh button found; press refresh in the Lora tab")
    return done


def _refresh_handlers(demo):
    """(button elem_id, handler) for the extra-networks refresh buttons in the WebUI's Blocks. Reads
    gradio's event table: `fns` is a list in gradio 3 (targets in `dependencies`) and a dict of
    BlockFunction with `targets` in gradio 4."""
    if demo is None:
        return
    blocks = getattr(demo, "blocks", {}) or {}
    fns = getattr(demo, "fns", None) or []
    fns = list(fns.values()) if isinstance(fns, dict) else list(fns)
    dependencies = getattr(demo, "dependencies", None) or []
    for index, block_fn in enumerate(fns):
        targets = getattr(block_fn, "targets", None)
        if targets is None and index < len(dependencies):
            targets = dependencies[index].get("targets")
        for target in targets or []:
            block_id = target[0] if isinstance(target, (tuple, list)) else target
            elem_id = getattr(blocks.get(block_id), "elem_id", None) or ""
            if _REFRESH_BUTTON.match(elem_id) and callable(getattr(block_fn, "fn", None)):
                yield elem_id, block_fn.fn
