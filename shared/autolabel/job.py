"""Auto-label as a daemon job: the options a client may send, checked before the job is queued.

The options are declared in shared/schema/label.py (their names are `label_folder`'s keyword
arguments). The daemon checks them in its server process, so this module imports no torch; the worker
then calls `label_folder` with them, which shares the GPU fairly with training because jobs run one at a
time in the same queue.
"""

from __future__ import annotations

from pathlib import Path

from shared import schema
from shared.errors import ConfigError
from shared.roots import Roots


def label_options(raw: dict, *, source: str = "label job", base_dir: Path | None = None, roots: Roots | None = None,
                  require_absolute: bool = False) -> dict:
    """Checked keyword arguments for `label_folder`, with absolute paths: the values, then (with `roots`)
    every path against its roots (`output` first, so nothing outside them is looked at), then whether the
    folders and files exist."""
    from shared.preflight import check_exist, confine_paths

    if "format" in raw and "fmt" not in raw:  # the CLI's name for it
        raw = {**{k: v for k, v in raw.items() if k != "format"}, "fmt": raw["format"]}
    raw = dict(raw)
    # what the client calls each option ({"weights": "clip_weights"}), so errors inside a host name its inputs
    field_names = raw.pop("field_names", None) or {}
    if not isinstance(field_names, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in field_names.items()):
        raise ConfigError(f"{source}: field_names: expected option names mapped to the client's labels")
    options = schema.coerce_config(raw, source=source, base_dir=base_dir, require_absolute=require_absolute,
                                   kind="label")
    if roots is not None:
        confine_paths(options, schema.LABEL, roots)
        confine_paths({}, {}, roots, extra=[("output", write_target(options), "write")])
    check_exist(options, schema.LABEL, lambda key: source, label=lambda key: field_names.get(key, key))
    if options["model"] is None:
        options.pop("model")  # label_folder's own default architecture
    options["field_names"] = field_names or None
    return options


def write_target(options: dict) -> Path:
    """Where a label job writes: metadata.csv (or the folder of .txt files). The daemon confines this too:
    by default it is inside input_dir, which only the read roots admitted."""
    if options["fmt"] == "txt":
        return Path(options["output"] or options["input_dir"])
    output = options["output"]
    if output is None:
        return Path(options["input_dir"]) / "metadata.csv"
    return output / "metadata.csv" if Path(output).is_dir() else Path(output)
