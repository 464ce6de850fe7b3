"""Auto-label as a daemon job: the options a client may send, checked before the job is queued.

The daemon validates these in its server process, so this module imports no torch. The worker then
calls `label_folder` with them, which shares the GPU fairly with training because jobs run one at a
time in the same queue.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from shared.config import coerce_value
from shared.errors import ConfigError

# option -> (type, default); the names match `label_folder`'s keyword arguments
LABEL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "input_dir": (Path, None),
    "output": (typing.Optional[Path], None),  # noqa: UP045 - coerce_value reads typing forms
    "fmt": (Literal["csv", "txt"], "csv"),
    "trigger": (typing.Optional[str], None),  # noqa: UP045
    "vocab_file": (typing.Optional[Path], None),  # noqa: UP045
    "builtin_vocab": (bool, True),
    "top_k": (int, 2),
    "threshold": (float, 0.1),
    "batch_size": (int, 16),
    "device": (str, "auto"),
    "model": (typing.Optional[str], None),  # noqa: UP045
    "pretrained": (typing.Optional[str], None),  # noqa: UP045
    "weights": (typing.Optional[Path], None),  # noqa: UP045
    "overwrite": (bool, False),
    # what the client calls each option ({"weights": "clip_weights"}), so errors name its inputs
    "field_names": (typing.Optional[dict], None),  # noqa: UP045
}
READ_PATHS = ("input_dir", "vocab_file", "weights")


def label_options(raw: dict, *, source: str = "label job", base_dir: Path | None = None) -> dict:
    """Validated keyword arguments for `label_folder`, with absolute paths."""
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if "format" in raw and "fmt" not in raw:  # the CLI's name for it
        raw = {**{k: v for k, v in raw.items() if k != "format"}, "fmt": raw["format"]}
    options = {}
    for key, value in raw.items():
        if key not in LABEL_OPTIONS:
            raise ConfigError(f"{source}: unknown label option {key!r} (options: {', '.join(LABEL_OPTIONS)})")
        options[key] = coerce_value(key, value, LABEL_OPTIONS[key][0], source, base_dir)
    for key, (_, default) in LABEL_OPTIONS.items():
        options.setdefault(key, default)
    if options["model"] is None:
        options.pop("model")  # label_folder's own default architecture
    if options["input_dir"] is None:
        raise ConfigError(f"{source}: missing required label option 'input_dir' (the folder of images)")
    if not options["input_dir"].is_dir():
        label = (options["field_names"] or {}).get("input_dir", "input_dir")
        raise ConfigError(f"{source}: {label}: {options['input_dir']} is not a folder")
    names = options["field_names"] or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ConfigError(f"{source}: field_names: expected option names mapped to the client's labels")
    for key in ("vocab_file", "weights"):
        if options[key] is not None and not options[key].exists():
            raise ConfigError(f"{source}: {names.get(key, key)}: {options[key]} does not exist")
    return options


def write_target(options: dict) -> Path:
    """Where a label job writes: metadata.csv (or the folder of .txt files)."""
    if options["fmt"] == "txt":
        return Path(options["output"] or options["input_dir"])
    output = options["output"]
    if output is None:
        return Path(options["input_dir"]) / "metadata.csv"
    return output / "metadata.csv" if Path(output).is_dir() else Path(output)
