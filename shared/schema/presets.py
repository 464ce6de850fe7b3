"""`preset`: one of the shipped presets (shared/presets/*.yaml), named sets of keys for a goal and a card.

The choices are the preset files' names, listed from their folder here with the standard library alone, so
the tab and the node offer them without reading YAML. The trainer and the daemon expand a preset before the
values are checked (shared/presets.apply_preset: the preset's keys first, the config's own keys over them);
the preset's family is checked against the base model's once that is known (a family rule, below).
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .setting import BASIC, IMAGES, Form, Rule, Setting

SECTION = "Preset"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
NONE = "none"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux": "Flux"}
_FAMILY_LINE = re.compile(r"^family:\s*([A-Za-z0-9_]+)\s*$", re.MULTILINE)


def preset_names() -> tuple[str, ...]:
    """Every shipped preset's name (its file's stem), sorted."""
    return tuple(sorted(p.name.removesuffix(".yaml") for p in PRESET_DIR.glob("*.yaml")))


def preset_family(name: str) -> str | None:
    """The `family:` line of a shipped preset (sd1, sd2, sdxl, flux), read without a YAML parser: the files
    are ours, and tests/test_presets.py holds this to what PyYAML reads."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    match = _FAMILY_LINE.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match else None


SETTINGS = (
    Setting("preset", str, NONE, "A shipped preset (docs/sd-training.md lists what each is tuned for): it sets its "
            "keys first and every key you set yourself wins. In the tab and the node, the fields left at their "
            "default take the preset's values; the YAML box always wins.", tasks=IMAGES,
            choices=(NONE, *preset_names()), form=Form(BASIC, "Preset")),
)


def _preset_fits_the_model(v, family) -> str | None:
    name = v["preset"]
    wanted = preset_family(name) if name != NONE else None
    model = "flux" if family.task == "flux" else family.arch  # a Flux preset fits dev and schnell alike
    if wanted is None or wanted == model or (model == "sd" and wanted in ("sd1", "sd2", "sdxl")):
        return None  # "sd": a .ckpt whose family the header does not tell; the loader checks it
    fitting = [n for n in preset_names() if preset_family(n) == model]
    instead = f"use one of {', '.join(fitting)}" if fitting else "no shipped preset fits it; remove preset"
    return (f"preset {name} is for {FAMILY_NAMES.get(wanted, wanted)} models, but base_model is {family.describe()}; "
            f"{instead}")


RULES = (Rule(("preset",), _preset_fits_the_model, tasks=IMAGES, family=True),)


def form_values(values: Mapping[str, Any], table: Mapping[str, Setting]) -> dict[str, Any]:
    """A host form's basic fields as it sends them: all of them, except that with a preset chosen the ones
    still at their declared default are left out, so the preset's values apply (a field the user changed
    wins, as any key the user sets does). Without a preset, `preset` itself is left out."""
    if values.get("preset") in (None, "", NONE):
        return {k: v for k, v in values.items() if k != "preset"}
    return {k: v for k, v in values.items() if k == "preset" or k not in table or v != table[k].default}
