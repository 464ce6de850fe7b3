"""Shipped training presets: named sets of config keys for a goal and a card (`preset: sdxl-character-12gb`).

Each preset is a YAML file in this folder: `name` (the file's stem), `family` (sd1, sdxl, flux),
`card` (the GPU memory it is sized for), `goal`, `description` (what it is tuned for) and `values`
(config keys). A config that names a preset gets the preset's values first and its own keys on top:
the user's keys always win. Reading needs only PyYAML (the tab and the node list them without torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from shared.errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
PRESET_KEY = "preset"
NO_PRESET = "none"  # the choice that sets nothing (the hosts' dropdowns need a value)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    card: str
    goal: str
    description: str
    values: dict[str, Any]


def _folder():
    return resources.files("shared.presets")


def _read(entry) -> Preset:
    try:
        data = yaml.safe_load(entry.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {entry.name}: not valid YAML ({exc})") from None
    stem = entry.name.removesuffix(".yaml")
    if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
        raise ConfigError(f"preset {entry.name}: expected name, family, description and a `values` mapping")
    if data.get("name") != stem or data.get("family") not in FAMILIES:
        raise ConfigError(f"preset {entry.name}: `name` must be {stem!r} and `family` one of {', '.join(FAMILIES)}")
    return Preset(stem, data["family"], str(data.get("card", "")), str(data.get("goal", "")),
                  " ".join(str(data.get("description", "")).split()), dict(data["values"]))


def list_presets(family: str | None = None) -> list[Preset]:
    """Every shipped preset (of one family), by name."""
    presets = [_read(e) for e in _folder().iterdir() if e.name.endswith(".yaml")]
    return sorted((p for p in presets if family is None or p.family == family), key=lambda p: p.name)


def get_preset(name: str) -> Preset:
    for entry in _folder().iterdir():
        if entry.name == f"{name}.yaml":
            return _read(entry)
    known = ", ".join(p.name for p in list_presets())
    raise ConfigError(f"preset: unknown preset {name!r} (shipped: {known})")


def apply_preset(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A raw config mapping with its `preset` expanded: the preset's values, then the mapping's own
    keys over them (`preset` stays, naming what was applied). A mapping without one, or with `preset:
    none` (or empty), comes back without the key."""
    name = data.get(PRESET_KEY)
    if name in (None, "", NO_PRESET):
        return {k: v for k, v in data.items() if k != PRESET_KEY}
    if not isinstance(name, str):
        raise ConfigError(f"{source}: preset: expected a preset name, got {name!r}")
    try:
        preset = get_preset(name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return {**preset.values, **data}


def preset_origins(data: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> dict[str, str]:
    """Where each key came from, for the messages: the keys a preset set are named as the preset's."""
    name = data.get(PRESET_KEY)
    origins = dict(origins or {})
    if name in (None, "", NO_PRESET) or not isinstance(name, str):
        return origins
    try:
        preset = get_preset(name)
    except ConfigError:
        return origins  # apply_preset names the unknown preset
    for key in preset.values:
        if key not in data:
            origins.setdefault(key, f"{source} (preset {name})")
    return origins
