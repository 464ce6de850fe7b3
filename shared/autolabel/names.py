"""What each labelling option is called where the person set it, for the one-line errors.

The same checks serve the CLI (`--weights`), the ComfyUI node (`clip_weights`) and the WebUI tab
("CLIP weights"): a message inside a host must name that host's inputs, not flags it does not have.
`label_folder(..., field_names=...)` sets the names for the duration of one labelling run; options a
caller does not name keep their CLI flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CLI = {
    "input_dir": "--input", "output": "--output", "fmt": "--format", "trigger": "--trigger",
    "vocab_file": "--vocab", "builtin_vocab": "--no-builtin-vocab", "top_k": "--top-k",
    "threshold": "--threshold", "batch_size": "--batch-size", "device": "--device", "model": "--model",
    "pretrained": "--pretrained", "weights": "--weights", "overwrite": "--overwrite",
}
_current: ContextVar[dict[str, str]] = ContextVar("autolabel_field_names", default=CLI)


def name(option: str) -> str:
    """The caller's name for a `label_folder` option."""
    return _current.get().get(option, option)


def ask(option: str, value: str) -> str:
    """`give --weights FILE` on the command line, `set clip_weights to FILE` in a host's form."""
    label = name(option)
    return f"give {label} {value}" if label.startswith("-") else f"set {label} to {value}"


@contextmanager
def named(field_names: dict[str, str] | None) -> Iterator[None]:
    token = _current.set({**CLI, **(field_names or {})})
    try:
        yield
    finally:
        _current.reset(token)
