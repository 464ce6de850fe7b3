#!/usr/bin/env python3
"""Set up lora-daemon: its own environment (never a host's), the WebUI tab and the ComfyUI node.

    python3 install.py                      create or update the daemon's environment (./.venv)
    python3 install.py --webui PATH         ... and link the tab into an AUTOMATIC1111/Forge install
    python3 install.py --comfyui PATH       ... and link the node pack into a ComfyUI install
    python3 install.py --check              report what is installed and whether the daemon answers
    python3 install.py --uninstall          remove exactly what install.py added
    python3 install.py --service            also write a systemd user unit that starts the daemon at login
    python3 install.py --copy ...           copy the extensions instead of linking them
    python3 install.py --demo               set up, then run the bundled demo through the daemon
    python3 install.py --test               set up with the test tools, then run the test suite

With neither --webui nor --comfyui, hosts are looked for in the usual places and used only when
exactly one of a kind is found. What was done is recorded in <state dir>/install.json (the daemon's
environment, links, Lora folders the daemon may write to), which the extensions read to start the
daemon and `--uninstall` reads to undo it. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAMP = ".lora-daemon-install"
COPY_MARKER = ".lora-daemon-copy"
RECORD = "install.json"
# The folder names in each host: the WebUI's extension folder, ComfyUI's node pack. ComfyUI's name is the
# one docs/comfyui.md and the example workflow (its data set path) use.
LINK_NAMES = {"webui": "lora-daemon", "comfyui": "lora_daemon"}
SERVICE = Path.home() / ".config" / "systemd" / "user" / "lora-daemon.service"


# --- the daemon's environment ----------------------------------------------------------------------


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted_state(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return f"{digest} {extras} {ROOT}"


def ensure_venv(venv_dir: Path, dev: bool) -> tuple[Path, bool]:
    """Create the venv if needed and install the project unless it is current. (python, created)"""
    python = venv_python(venv_dir)
    created = False
    if not python.exists():
        print(f"Creating the daemon environment in {venv_dir} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
        created = True
    extras = "[dev]" if dev else ""
    stamp = venv_dir / STAMP
    current = stamp.read_text().splitlines() if stamp.exists() else []
    wanted = _wanted_state(extras)
    if wanted in current or (not dev and _wanted_state("[dev]") in current):
        return python, created
    print(f"Installing lora-daemon{extras} and its dependencies (torch, diffusers, ...) ...", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-q", "-e", f"{ROOT}{extras}"], check=True)
    stamp.write_text(wanted + "\n")
    return python, created


# --- hosts -----------------------------------------------------------------------------------------


def state_dir(arg: str | None) -> Path:
    """The daemon's state folder, found the way shared/client.py finds it."""
    if arg:
        return Path(arg).expanduser().resolve()
    if os.environ.get("LORA_DAEMON_HOME"):
        return Path(os.environ["LORA_DAEMON_HOME"]).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "lora-daemon"


def is_webui(path: Path) -> bool:
    return (path / "extensions").is_dir() and ((path / "webui.py").is_file() or (path / "launch.py").is_file())


def is_comfyui(path: Path) -> bool:
    return (path / "custom_nodes").is_dir() and (path / "folder_paths.py").is_file()


def detect(kind: str) -> Path | None:
    """The one install of `kind` in the usual places, or None (none, or more than one: ambiguous)."""
    home = Path.home()
    if kind == "webui":
        names, check = ("stable-diffusion-webui", "stable-diffusion-webui-forge", "sd-webui-forge"), is_webui
    else:
        names, check = ("ComfyUI", "comfyui"), is_comfyui
    found = sorted({p.resolve() for name in names for p in (home / name, Path.cwd() / name) if check(p)})
    if len(found) > 1:
        print(f"Found several {kind} installs ({', '.join(map(str, found))}): pass --{kind} PATH to pick one")
        return None
    return found[0] if found else None


def host_layout(kind: str, path: Path) -> tuple[Path, Path, Path]:
    """(link to create, what it points at, the host's Lora folder)."""
    if kind == "webui":
        return path / "extensions" / LINK_NAMES[kind], ROOT / "extension_webui", path / "models" / "Lora"
    return path / "custom_nodes" / LINK_NAMES[kind], ROOT / "comfy_nodes", path / "models" / "loras"


def link_extension(link: Path, target: Path, copy: bool = False) -> str:
    """Symlink (or copy, where links cannot be made or `copy` asks) `target` at `link`. Never replaces a
    stranger. A copy gets COPY_MARKER, naming this checkout: the extension reads it to find the
    repository (the thin client, the daemon's environment), which a link finds by resolving itself."""
    if link.is_symlink():
        if link.resolve() == target.resolve() and not copy:
            return "present"
        if link.resolve() != target.resolve():
            raise SystemExit(f"error: {link} is a link to {os.readlink(link)}, not to {target}; remove it first")
        link.unlink()  # ours, but a copy was asked for
    if link.exists():
        if (link / COPY_MARKER).is_file():
            shutil.rmtree(link)  # our own earlier copy: refresh it
        else:
            raise SystemExit(f"error: {link} already exists and is not lora-daemon's; move it away first")
    if not copy:
        try:
            link.symlink_to(target, target_is_directory=True)
            return "linked"
        except OSError:
            pass
    shutil.copytree(target, link, ignore=shutil.ignore_patterns("__pycache__"))
    (link / COPY_MARKER).write_text(json.dumps({"repo": str(ROOT), "copied_from": str(target)}) + "\n")
    return "copied"


def remove_link(link: Path, target: Path) -> bool:
    if link.is_symlink() and link.resolve() == target.resolve():
        link.unlink()
        return True
    if link.is_dir() and (link / COPY_MARKER).is_file():
        shutil.rmtree(link)
        return True
    return False


def read_record(state: Path) -> dict:
    try:
        return json.loads((state / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_record(state: Path, record: dict) -> bool:
    """Write install.json if it changed; True when it did."""
    path = state / RECORD
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    state.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def service_unit(python: Path, state: Path) -> str:
    return (
        "[Unit]\nDescription=lora-daemon (LoRA trainer)\n\n"
        f"[Service]\nExecStart={python} -m daemon serve --state-dir {state}\nWorkingDirectory={ROOT}\n"
        "Environment=HF_HUB_OFFLINE=1\nRestart=on-failure\n\n[Install]\nWantedBy=default.target\n"
    )


# --- commands --------------------------------------------------------------------------------------


def install(args: argparse.Namespace, python: Path, created_venv: bool) -> None:
    state = state_dir(args.state_dir)
    record = read_record(state)
    hosts = dict(record.get("hosts", {}))
    wanted = {"webui": args.webui, "comfyui": args.comfyui}
    if not args.webui and not args.comfyui and not args.demo and not args.test:
        wanted = {kind: detect(kind) for kind in ("webui", "comfyui")}
    for kind, path in wanted.items():
        if not path:
            continue
        path = Path(path).expanduser().resolve()
        if not (is_webui(path) if kind == "webui" else is_comfyui(path)):
            what = "extensions/ and webui.py" if kind == "webui" else "custom_nodes/ and folder_paths.py"
            raise SystemExit(f"error: --{kind} {path}: not a {kind} folder (expected {what})")
        link, target, lora_dir = host_layout(kind, path)
        status = link_extension(link, target, copy=args.copy)
        print(f"{kind}: {status} {link} -> {target}; the daemon may write into {lora_dir}")
        earlier = hosts.get(kind, {}).get("link")
        if earlier and Path(earlier) != link and remove_link(Path(earlier), target):  # an older name of ours
            print(f"{kind}: removed the link under its old name {earlier}")
        hosts[kind] = {"path": str(path), "link": str(link), "lora_dir": str(lora_dir)}
    service = record.get("service")
    if args.service:
        SERVICE.parent.mkdir(parents=True, exist_ok=True)
        text = service_unit(python, state)
        if not SERVICE.is_file() or SERVICE.read_text() != text:
            SERVICE.write_text(text)
            print(f"Wrote {SERVICE}; enable it with: systemctl --user enable --now lora-daemon")
        service = str(SERVICE)
    record = {
        "python": str(python),
        "repo": str(ROOT),
        "venv": str(python.parent.parent),
        "created_venv": bool(record.get("created_venv") or created_venv),
        "hosts": hosts,
        "lora_dirs": sorted({h["lora_dir"] for h in hosts.values()}),
        "service": service,
    }
    if write_record(state, record):
        print(f"Recorded the daemon's environment and host folders in {state / RECORD}")
    else:
        print(f"Nothing changed ({state / RECORD} is up to date)")


def uninstall(args: argparse.Namespace) -> int:
    state = state_dir(args.state_dir)
    record = read_record(state)
    if not record:
        print(f"Nothing to undo: no {state / RECORD}")
        return 0
    for kind, host in record.get("hosts", {}).items():
        target = ROOT / ("extension_webui" if kind == "webui" else "comfy_nodes")
        if remove_link(Path(host["link"]), target):
            print(f"Removed {host['link']}")
    if record.get("service") and Path(record["service"]).is_file():
        Path(record["service"]).unlink()
        print(f"Removed {record['service']} (run: systemctl --user daemon-reload)")
    (state / RECORD).unlink()
    if record.get("created_venv") and Path(record["venv"]).is_dir() and Path(record["venv"]) != Path(sys.prefix):
        shutil.rmtree(record["venv"])
        print(f"Removed the daemon environment {record['venv']}")
    print(f"Kept {state} (your jobs, their LoRAs and logs, the token)")
    return 0


def check(args: argparse.Namespace) -> int:
    state = state_dir(args.state_dir)
    record = read_record(state)
    ok = True
    python = Path(record.get("python", venv_python(args.venv.resolve())))
    print(f"daemon environment: {python} {'(ok)' if python.exists() else '(missing: run python3 install.py)'}")
    ok &= python.exists()
    for kind, host in record.get("hosts", {}).items():
        link = Path(host["link"])
        good = link.exists()
        ok &= good
        print(f"{kind}: {link} {'(ok)' if good else '(missing: run install.py again)'}; Lora folder {host['lora_dir']}")
    if python.exists():
        probe = ("import json,sys; from shared.launcher import daemon_answers; "
                 "info = daemon_answers(sys.argv[1]); print(json.dumps(info))")
        out = subprocess.run([str(python), "-c", probe, str(state)], capture_output=True, text=True, cwd=ROOT)
        info = json.loads(out.stdout.strip() or "null") if out.returncode == 0 else None
        print(f"daemon: {'answers, version ' + info['version'] if info else 'not running (the extensions start it)'}")
    return 0 if ok else 1


def test_workers(rest: list[str]) -> list[str]:
    """pytest-xdist's options for the suite unless the command line chose its own (`-n`, `-p no:xdist`):
    one process per core and one more, each file in one process (its fixtures built once). Many tests
    wait on a daemon, a worker or a browser they started, so one extra process keeps the cores busy;
    on 2 cores the suite takes about half the time of one process."""
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in rest):
        return []
    return ["-n", str(min(8, (os.cpu_count() or 1) + 1)), "--dist", "loadfile"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the daemon's environment (default ./.venv)")
    parser.add_argument("--webui", help="an AUTOMATIC1111 / Forge folder: link the Train LoRA tab into it")
    parser.add_argument("--comfyui", help="a ComfyUI folder: link the Train LoRA nodes into it")
    parser.add_argument("--state-dir", help="the daemon's state folder (default ~/.local/state/lora-daemon)")
    parser.add_argument("--service", action="store_true", help="write a systemd user unit for the daemon")
    parser.add_argument("--copy", action="store_true",
                        help="copy the extensions instead of linking them (for folders where links cannot be made; "
                             "run install.py again after updating the checkout)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--uninstall", action="store_true", help="remove what install.py added")
    action.add_argument("--check", action="store_true", help="report what is installed; is the daemon up?")
    action.add_argument("--demo", action="store_true", help="run the bundled demo afterwards")
    action.add_argument("--test", action="store_true", help="install the test tools and run the tests")
    args, rest = parser.parse_known_args(argv)

    if args.uninstall:
        return uninstall(args)
    if args.check:
        return check(args)
    python, created = ensure_venv(args.venv.resolve(), dev=args.test)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.test:
        return subprocess.run([str(python), "-m", "pytest", *test_workers(rest), *rest], cwd=ROOT, env=env).returncode
    if args.demo and not (args.webui or args.comfyui or args.service or args.state_dir):
        # the demo keeps its daemon's state in demo_output/ and starts it with this Python: nothing is
        # recorded in (or written to) the user's own state folder
        return subprocess.run([str(python), "-m", "daemon", "demo", *rest], cwd=ROOT, env=env).returncode
    install(args, python, created)
    if args.demo:
        return subprocess.run([str(python), "-m", "daemon", "demo", *rest], cwd=ROOT, env=env).returncode
    print(f"Done. The daemon runs with: {python} -m daemon serve (the tab and the node start it when needed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
