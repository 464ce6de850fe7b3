"""The daemon's own settings: where it listens, where it keeps state, which folders jobs may touch.

Read from `<state dir>/config.yaml` when it exists, then overridden by `serve` flags. Every key is
optional; the defaults are safe for one local user: loopback only, one GPU job at a time, jobs may
read and write only under the user's home folder (and the daemon's own job folders).

    host: 127.0.0.1           # bind address; anything but loopback is refused unless allow_remote: true
    port: 7861                # 7860 is AUTOMATIC1111/Forge, 8188 ComfyUI
    read_roots: [~]           # every path a job reads (base_model, train_data_dir, ...) must be under one
    write_roots: [~]          # every path it writes (output_dir, log_dir, deploy_dir, cache_dir) too
    allowed_origins: []       # browser origins allowed to connect (no Origin header is always allowed)
    allowed_hosts: []         # extra Host header values (127.0.0.1/localhost/[::1] with the port are built in)
    max_connections: 64       # a WebUI tab, a ComfyUI node and CLI followers each hold one
    max_message_bytes: 1048576
    max_parallel_jobs: 1
    heartbeat_s: 15
    resume_interrupted: true  # a job found running at start-up is re-queued (else marked failed)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from shared.client import DEFAULT_HOST, DEFAULT_PORT, default_state_dir
from shared.errors import ConfigError
from shared.roots import confine  # noqa: F401 - the daemon's path check, where tests and callers look for it


@dataclass
class Settings:
    state_dir: Path = field(default_factory=default_state_dir)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    read_roots: list[Path] = field(default_factory=lambda: [Path.home()])
    write_roots: list[Path] = field(default_factory=lambda: [Path.home()])
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    max_connections: int = 64
    max_message_bytes: int = 1 << 20
    max_parallel_jobs: int = 1
    heartbeat_s: float = 15.0
    resume_interrupted: bool = True

    @property
    def config_file(self) -> Path:
        return self.state_dir / "config.yaml"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "daemon.sqlite3"

    def host_allowlist(self, port: int) -> set[str]:
        """Exact Host header values a client may send (DNS rebinding sends the attacker's name)."""
        names = {"127.0.0.1", "localhost", "[::1]"}
        if self.host not in ("0.0.0.0", "::"):
            names.add(f"[{self.host}]" if ":" in self.host else self.host)
        allowed = {f"{name}:{port}" for name in names}
        allowed.update(h.lower() for h in self.allowed_hosts)
        return {h.lower() for h in allowed}


_LIST_OF_PATHS = {"read_roots", "write_roots"}
_LIST_OF_STR = {"allowed_origins", "allowed_hosts"}


def load_settings(state_dir: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `<state_dir>/config.yaml`, then `overrides` (None values are ignored)."""
    state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
    values: dict[str, Any] = {}
    config_file = state_dir / "config.yaml"
    if config_file.is_file():
        try:
            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: is not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a mapping of `key: value` lines")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Settings)} - {"state_dir"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{config_file}: unknown daemon setting {key!r} (known: {', '.join(sorted(known))})")
    settings = Settings(state_dir=state_dir.resolve())
    for key, raw in values.items():
        setattr(settings, key, _coerce(key, raw, config_file))
    # the hosts' Lora folders install.py linked us into: finished LoRAs may always be deployed there
    for folder in installed_lora_dirs(state_dir):
        if not any(folder.is_relative_to(root) for root in settings.write_roots):
            settings.write_roots.append(folder)
    _check(settings, config_file)
    return settings


def installed_lora_dirs(state_dir: Path) -> list[Path]:
    """`lora_dirs` from the install.json install.py writes (its file; the user's config.yaml stays theirs)."""
    import json

    try:
        record = json.loads((Path(state_dir) / "install.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    dirs = record.get("lora_dirs") if isinstance(record, dict) else None
    return [Path(d).expanduser().resolve() for d in dirs or [] if isinstance(d, str)]


def _coerce(key: str, raw: Any, source: Path) -> Any:
    default = getattr(Settings(), key)
    if key in _LIST_OF_PATHS:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"{source}: {key}: expected a list of folders, got {raw!r}")
        return [Path(x).expanduser().resolve() for x in items]
    if key in _LIST_OF_STR:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"{source}: {key}: expected a list of names, got {raw!r}")
        return list(items)
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {raw!r}")
        return raw
    if isinstance(default, (int, float)):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {raw!r}")
        return type(default)(raw)
    return str(raw)


def _check(settings: Settings, source: Path) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"{source}: port must be 0-65535, got {settings.port}")
    if not settings.allow_remote and not _is_loopback(settings.host):
        raise ConfigError(
            f"{source}: host {settings.host!r} is not a loopback address; the daemon runs jobs with your "
            "files and GPU, so it listens on 127.0.0.1 unless you set allow_remote: true"
        )
    for key in ("max_connections", "max_message_bytes", "max_parallel_jobs"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"{source}: {key} must be at least 1")
    if settings.heartbeat_s <= 0:
        raise ConfigError(f"{source}: heartbeat_s must be positive")
    if "null" in settings.allowed_origins:
        raise ConfigError(f"{source}: allowed_origins may not contain 'null' (sandboxed pages and files send it)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
