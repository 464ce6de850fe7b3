"""The job configs as JSON Schema (draft 2020-12), for other clients: `python -m daemon schema`, and
inside daemon/protocol.schema.json as the `config` of a `submit`.

Each property carries the declaration's rule (minimum, maximum, multipleOf, enum, pattern), default and
help, plus three annotations a client can build a form from: `x-tasks` (the jobs it applies to),
`x-section` and `x-form` (level, label, widget). The daemon is more lenient than the schema in one way:
numbers may come as text (YAML 1.1 reads `2e-4` as a string), and lists as comma-separated text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import job_table
from .setting import Setting

_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "string"}
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def property_schema(setting: Setting) -> dict[str, Any]:
    """One setting as a JSON Schema property."""
    if setting.type is list:
        item = {"type": "string", "minLength": 1} if setting.items is str else {"type": _TYPES[setting.items]}
        if setting.items is not str and setting.minimum is not None:
            item["minimum"] = setting.minimum
        items = {"type": "array", "items": item}
        if setting.min_items:
            items["minItems"] = setting.min_items
        prop: dict[str, Any] = {"anyOf": [items, {"type": "string"}]}
    elif setting.type is dict:  # keyword arguments: scalars, or lists of them
        scalar = {"type": ["number", "boolean", "string"]}
        prop = {"type": "object", "additionalProperties": {"anyOf": [scalar, {"type": "array", "items": scalar}]}}
    else:
        prop = {"type": _TYPES[setting.type]}
        if setting.type is Path:
            prop["minLength"] = 1
    if setting.optional and setting.type is not list:
        prop["type"] = [prop["type"], "null"]
    elif setting.optional:
        prop["anyOf"].append({"type": "null"})
    if setting.choices is not None:
        prop["enum"] = list(setting.choices)
        kinds = sorted({_TYPES[type(c)] for c in setting.choices})
        if kinds != [prop["type"]]:  # e.g. `auto`, true or false
            prop["type"] = kinds + (["null"] if setting.optional else [])
    for bound, exclusive, word in ((setting.minimum, setting.exclusive_minimum, "Minimum"),
                                   (setting.maximum, setting.exclusive_maximum, "Maximum")):
        if bound is not None and setting.type is not list:  # a list's bounds are its items' (above)
            prop[f"exclusive{word}" if exclusive else word.lower()] = bound
    if setting.multiple_of:
        prop["multipleOf"] = setting.multiple_of
    if setting.pattern and setting.type is not list:  # a list of numbers' word: comma-separated text too
        prop["pattern"] = f"^(?:{setting.pattern})$"
    if setting.default is not None:
        prop["default"] = list(setting.default) if isinstance(setting.default, tuple) else setting.default
    prop["description"] = setting.help
    prop["x-tasks"] = sorted(setting.tasks)
    prop["x-section"] = setting.section
    form = {"level": setting.form.level, "label": setting.label}
    if setting.form.widget:
        form["widget"] = setting.form.widget
    prop["x-form"] = form
    if setting.path:
        prop["x-path"] = setting.path
    return prop


def config_schema(kind: str = "train") -> dict[str, Any]:
    """The schema of a job's `config`: a training config (kind train), the auto-label options (label) or a
    LoRA tool's options (lora_resize, ...)."""
    table = job_table(kind)
    schema: dict[str, Any] = {
        "type": "object",
        "title": {"train": "training job config", "label": "auto-label job options"}.get(kind, f"{kind} job options"),
        "properties": {name: property_schema(s) for name, s in table.items()},
        "additionalProperties": False,
    }
    required = [name for name, s in table.items() if s.required and name != "output_dir"]
    schema["required"] = required
    if kind == "train":  # the daemon keeps the files in the job's own folder when only output_name is given
        schema["anyOf"] = [{"required": ["output_dir"]}, {"required": ["output_name"]}]
    elif kind == "label":
        schema["properties"]["format"] = {**property_schema(table["fmt"]), "description": "The same as fmt."}
    return schema


def document(kind: str = "train") -> dict[str, Any]:
    """`config_schema` as a standalone JSON Schema document."""
    return {"$schema": DIALECT, **config_schema(kind)}
