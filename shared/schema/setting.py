"""One job setting, declared once: its type, default, rule, help, the jobs it applies to, and how a form
shows it. Everything else (TrainConfig, the hosts' inputs, the JSON Schema, the docs, the messages) is
generated from these declarations.

Standard library only, and only relative imports: the WebUI tab and the ComfyUI pack load this package
inside the host's Python under a private name (see shared/host_import.py).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ..errors import ConfigError

# The jobs a setting applies to. A training setting is common (every trainer reads it), belongs to the
# image families (SD and Flux: images, buckets, captions, previews), to SD and LLM, or to one family;
# the auto-label job has its own options.
SD, LLM, FLUX, LABEL = "sd", "llm", "flux", "label"
COMMON = frozenset({SD, LLM, FLUX})
IMAGES = frozenset({SD, FLUX})
SD_LLM = frozenset({SD, LLM})
SD_ONLY = frozenset({SD})
LLM_ONLY = frozenset({LLM})
FLUX_ONLY = frozenset({FLUX})
LABEL_ONLY = frozenset({LABEL})
TASK_NAMES = {SD: "SD", LLM: "LLM", FLUX: "Flux", LABEL: "auto-label"}

TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text", Path: "a path",
              list: "a list of names", dict: "a mapping of names to values"}
BOOL_WORDS = {True: ("true", "yes", "on"), False: ("false", "no", "off")}
# what a `dict` setting's values may be: YAML/JSON scalars, or a list of them (e.g. betas: [0.9, 0.99])
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Form:
    """How a form shows a setting.

    `level`: `basic` (in the hosts' main form), `advanced` (folded away, grouped by section), `host`
    (each host fills it from its own widgets: a checkpoint list, a folder box) or `hidden` (the YAML box
    only). `widget` overrides the one the type implies (`lines`: one list item per line; for a `host` path,
    `vae` or `text_encoder`: a file from the host's own folder of that kind, which each host lists). `id`
    is a short name for host elements (the WebUI tab's `elem_id` is `lora_daemon_<id>`)."""

    level: str = "advanced"
    label: str | None = None
    widget: str | None = None
    id: str | None = None
    step: float | None = None


BASIC = "basic"


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # int, float, bool, str, Path, list (of names, or of `items`) or dict (names to values)
    default: Any
    help: str
    tasks: frozenset[str] = COMMON
    optional: bool = False  # None ("not set") is a value
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    multiple_of: int | None = None
    choices: tuple | None = None
    pattern: str | None = None  # a full-match regular expression for text ...
    pattern_help: str = ""  # ... and what it means, in words
    min_items: int | None = None  # lists
    items: type = str  # a list's items: str (names), or float / int (numbers; `pattern` then admits a word instead)
    path: str | None = None  # "read" or "write": which of the daemon's roots confine it
    exists: str | None = None  # "any", "file" or "dir": checked (after the roots) before the job is queued
    form: Form = field(default_factory=Form)
    section: str = ""

    @property
    def label(self) -> str:
        return self.form.label or self.name.replace("_", " ").capitalize()

    @property
    def form_id(self) -> str:
        return self.form.id or self.name

    def rule_text(self) -> str:
        """The rule in words, as messages and docs state it ("at least 1 and at most 4096", ...)."""
        parts = []
        bounds = bounds_text(self)
        if bounds:
            parts.append(bounds)
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.choices:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.pattern_help:
            parts.append(self.pattern_help)
        return "; ".join(parts)


@dataclass(frozen=True)
class Rule:
    """A check across settings, declared beside the settings it concerns. `check` gets every value (given
    or default) and returns the problem in words, or None; a `family` rule also gets the base model's
    family as the pre-flight read it from the checkpoint (its `task`, `name`, `how`,
    `resolution_multiple`) and runs only for jobs of its `tasks`. The message names where the first of
    `keys` came from."""

    keys: tuple[str, ...]
    check: Callable[..., str | None]
    tasks: frozenset[str] = COMMON
    family: bool = False


def number_text(value: float) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    return f"{value:g}"


def bounds_text(setting: Setting) -> str:
    parts = []
    if setting.minimum is not None:
        word = "greater than" if setting.exclusive_minimum else "at least"
        parts.append(f"{word} {number_text(setting.minimum)}")
    if setting.maximum is not None:
        word = "less than" if setting.exclusive_maximum else "at most"
        parts.append(f"{word} {number_text(setting.maximum)}")
    return " and ".join(parts)


class SettingError(ConfigError):
    """A value does not fit its setting. `key` names it; `problem` is the rest of the sentence, so a
    form can put its own label in front (`Rank: must be at least 1, got 0`)."""

    def __init__(self, where: str, key: str, problem: str, *, range_error: bool = False):
        self.where, self.key, self.problem = where, key, problem
        subject = f"{key} {problem}" if range_error else f"{key}: {problem}"
        super().__init__(f"{where}: {subject}" if where else subject)


def coerce(setting: Setting, raw: Any, *, where: str = "", base_dir: Path | None = None,
           require_absolute: bool = False) -> Any:
    """The value `raw` means for `setting`, checked against its type and rule; SettingError if it does
    not fit. Touches no file: a relative path is joined to `base_dir` (or refused with
    `require_absolute`, where no base folder was given)."""
    key = setting.name

    def fail(problem: str, range_error: bool = False):
        raise SettingError(where, key, problem, range_error=range_error)

    if raw is None or (isinstance(raw, str) and not raw.strip() and setting.type is not str):
        if setting.optional or setting.required:  # a missing required key is reported with its help
            return None
        fail("may not be empty")
    if isinstance(raw, str) and "\x00" in raw:
        fail("contains a NUL character")
    kind = setting.type
    if setting.choices is not None:
        if isinstance(raw, bool):  # YAML reads true/yes (false/no) as a bool: the choice that says so
            raw = next((word for word in BOOL_WORDS[raw] if word in setting.choices), raw)
        if raw not in setting.choices:
            fail(f"{raw!r} is not one of {', '.join(map(str, setting.choices))}")
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        fail(f"expected true or false, got {raw!r}")
    if kind in (int, float):
        value = _number(raw, kind, fail)
        _check_bounds(setting, value, raw, fail)
        return value
    if kind is list and setting.items is not str:
        return _numbers(setting, raw, fail)
    if kind is dict:
        return _mapping(raw, fail)
    if kind is list:
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            fail(f"expected a list of names, got {raw!r:.80}")
        if any("\x00" in x for x in raw):
            fail("contains a NUL character")
        if setting.min_items and len(raw) < setting.min_items:
            fail("is empty; leave it out for the default" if not raw else f"needs at least {setting.min_items} items")
        return list(raw)
    if kind is str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            fail(f"expected text, got {raw!r:.80}")
        text = str(raw)
        if setting.pattern and not re.fullmatch(setting.pattern, text):
            fail(f"{text!r:.80} must be {setting.pattern_help}", range_error=True)
        return text
    if kind is Path:
        if not isinstance(raw, (str, PurePath)) or not str(raw).strip():
            fail(f"expected a path, got {raw!r:.80}")
        path = Path(str(raw)).expanduser()
        if path.is_absolute():
            return path
        if require_absolute:
            fail(f"{str(raw)!r} is a relative path; send absolute paths or base_dir (the folder the config's "
                 "paths are relative to)")
        return (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    raise TypeError(f"setting {key} has an unsupported type {kind}")  # a bug in a declaration


def _numbers(setting: Setting, raw: Any, fail) -> list | str:
    """A list of numbers (a YAML list, or comma-separated text), or a word the setting's `pattern` admits
    (kept as text, e.g. a shape name that the trainer expands)."""
    words = f" or {setting.pattern_help}" if setting.pattern_help else ""
    if isinstance(raw, str):
        text = raw.strip()
        if setting.pattern and re.fullmatch(setting.pattern, text):
            return text
        raw = [part.strip() for part in text.split(",") if part.strip()]
        if not all(re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", part) for part in raw):
            fail(f"expected a list of numbers{words}, got {text!r:.80}")
    if not isinstance(raw, (list, tuple)):
        fail(f"expected a list of numbers{words}, got {raw!r:.80}")
    values = []
    for item in raw:
        value = _number(item, setting.items, fail)
        _check_bounds(setting, value, item, fail)
        values.append(value)
    if setting.min_items and len(values) < setting.min_items:
        fail("is empty; leave it out for the default" if not values else f"needs at least {setting.min_items} items")
    return values


def _mapping(raw: Any, fail) -> dict:
    """Names to scalars (or lists of scalars): keyword arguments, checked for their names elsewhere."""
    if not isinstance(raw, dict):
        fail(f"expected a mapping such as {{name: value, ...}}, got {raw!r:.80}")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.isidentifier():
            fail(f"{key!r:.40} is not a name")
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _SCALARS) for v in items):
            fail(f"{key}: expected a number, true/false, text or a list of them, got {value!r:.60}")
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            fail(f"{key}: expected a finite number, got {value!r}")
        out[key] = list(value) if isinstance(value, list) else value
    return out


def _number(raw: Any, kind: type, fail) -> int | float:
    if isinstance(raw, bool):
        fail(f"expected {TYPE_WORDS[kind]}, got {raw!r}")
    if isinstance(raw, str):  # YAML 1.1 reads `2e-4` as text; a form sends text
        text = raw.strip()
        try:
            raw = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            fail(f"expected {TYPE_WORDS[kind]}, got {raw!r:.80}")
    if not isinstance(raw, (int, float)):
        fail(f"expected {TYPE_WORDS[kind]}, got {raw!r:.80}")
    if isinstance(raw, float) and not math.isfinite(raw):
        fail(f"expected a finite number, got {raw!r}")
    if kind is int:
        if isinstance(raw, float):
            if not raw.is_integer():
                fail(f"expected a whole number, got {raw!r}")
            return int(raw)
        return raw
    return float(raw)


def _check_bounds(setting: Setting, value: float, raw: Any, fail) -> None:
    low, high = setting.minimum, setting.maximum
    below = low is not None and (value <= low if setting.exclusive_minimum else value < low)
    above = high is not None and (value >= high if setting.exclusive_maximum else value > high)
    if below or above:
        fail(f"must be {bounds_text(setting)}, got {number_text(raw) if isinstance(raw, (int, float)) else raw}",
             range_error=True)
    if setting.multiple_of and value % setting.multiple_of:
        fail(f"must be a multiple of {setting.multiple_of}, got {number_text(value)}", range_error=True)


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (see docs/config.md for the keys)"
