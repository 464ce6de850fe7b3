"""docs/config.md, generated from TrainConfig so the reference cannot drift from the code.

    python -m shared.config_docs > docs/config.md      (a test checks the committed file is current)
"""

from __future__ import annotations

import typing
from pathlib import Path

from shared.config import _HINTS, FIELDS

HEADER = """# Config reference

Every key of a training config (`python -m daemon train --config my.yaml`, `submit`, the WebUI tab's
advanced box, the ComfyUI node's advanced YAML), its type, default and meaning. Relative paths are
read relative to the config file. Generated from `shared/config.py` by `python -m shared.config_docs`.

| key | type | default | meaning |
| --- | --- | --- | --- |
"""


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return type_name(inner[0]) + " (optional)"
    if origin is list:
        return "list of " + type_name(args[0])
    if hint is Path:
        return "path"
    return getattr(hint, "__name__", str(hint))


def render() -> str:
    rows = []
    for name, field in FIELDS.items():
        default = field.default
        shown = "required" if field.metadata.get("required") else ("(none)" if default is None else f"`{default}`")
        text = field.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        kind = type_name(_HINTS[name])
        if field.metadata.get("required"):
            kind = kind.removesuffix(" (optional)")
        rows.append(f"| `{name}` | {kind} | {shown} | {text} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
