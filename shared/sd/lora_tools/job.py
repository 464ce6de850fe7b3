"""The LoRA tools as daemon jobs (`submit` with kind `lora_info`, `lora_resize`, `lora_merge`, `lora_extract`
or `lora_convert`): the options checked before the job is queued, and the run in the worker.

The options are declared in shared/schema/lora_tools.py; their names are the tool functions' keyword
arguments. `tool_job` runs in the daemon's server process, so this module imports no torch at the top: the
values first, then every input path against the read roots and the output folder against the write roots
(before any file is opened or looked at), then whether the inputs exist. The output's folder and name are
fixed then, so a cancelled or interrupted job's temporaries can be found (daemon/jobs.py). `run_tool` runs
in the worker: the tool with a progress callback that becomes `started` and `progress` events, and the
job's result.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared import schema
from shared.errors import ConfigError
from shared.roots import Roots
from shared.schema.lora_tools import KINDS

_LORAS = schema.Setting("loras", Path, None, "a LoRA file", required=True)  # each item's path, as a Path setting


def parse_loras(items: list[str], *, where: str, base_dir: Path | None, require_absolute: bool) -> list[tuple[Path, float]]:
    """`PATH` or `PATH:WEIGHT` items as (absolute path, weight), without looking at any file (the weight
    is what follows the last colon when it reads as a number; a Windows drive's colon does not)."""
    out = []
    for item in items:
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        out.append((schema.coerce(_LORAS, path, where=where, base_dir=base_dir, require_absolute=require_absolute),
                    weight))
    return out


def planned_output(kind: str, options: dict[str, Any]) -> tuple[Path, str] | None:
    """The folder and name the tool writes (the tools' own defaults: beside the input, named after it)."""
    if kind == "lora_info":
        return None
    if kind == "lora_resize":
        source = Path(options["file"])
        what = f"rank{options['rank']}" if options["rank"] is not None else f"energy{round(options['energy'] * 100)}"
        default = f"{source.stem}-{what}"
    elif kind == "lora_merge":
        source = Path(options["base"] or options["loras"][0][0])
        default = f"{source.stem}-merged"
    elif kind == "lora_extract":
        source = Path(options["tuned"])
        default = f"{source.stem}-lora"
    else:
        source = Path(options["file"])
        default = f"{source.stem}-{options['to']}"
    return Path(options["out_dir"] or source.parent), options["name"] or default


def tool_job(kind: str, raw: dict, *, source: str = "lora tool job", base_dir: Path | None = None,
             roots: Roots | None = None, require_absolute: bool = False) -> dict:
    """The checked job spec of a LoRA tool: `options` (JSON-able, paths absolute) and `output` (folder and
    name; None for info). ConfigError (PathNotAllowed for a path outside its roots) on the first problem."""
    from shared.preflight import check_exist, confine_paths

    if kind not in KINDS:
        raise ConfigError(f"{source}: unknown LoRA tool job {kind!r}; use one of {', '.join(KINDS)}")
    table = schema.job_table(kind)
    options = schema.coerce_config(raw, source=source, base_dir=base_dir, require_absolute=require_absolute,
                                   kind=kind)
    if "loras" in options:
        options["loras"] = parse_loras(options["loras"], where=source, base_dir=base_dir,
                                       require_absolute=require_absolute)
    output = planned_output(kind, options)
    if roots is not None:
        extra = [("loras", path, "read") for path, _ in options.get("loras", [])]
        if output is not None:
            extra.append(("out_dir", output[0], "write"))  # by default the input's folder: it must be writable
        confine_paths(options, table, roots, extra=extra)
    check_exist(options, table, lambda key: source, folders_to_write=True)
    for path, _ in options.get("loras", []):
        if not path.is_file():
            raise ConfigError(f"{source}: loras: {path} {'is a folder; give the file' if path.is_dir() else 'does not exist'}")
    if output is not None and output[0].is_file():
        raise ConfigError(f"{source}: out_dir: {output[0]} is a file; give a folder")
    canonical = schema.canonical(options)
    if "loras" in options:
        canonical["loras"] = [[str(path), weight] for path, weight in options["loras"]]
    return {"options": canonical, "output": None if output is None else {"folder": str(output[0]), "stem": output[1]}}


def job_name(kind: str, spec: dict) -> str:
    """A short name for the queue: the tool and what it writes (or reads)."""
    tool = kind.removeprefix("lora_")
    if spec["output"] is not None:
        return f"{tool}-{spec['output']['stem']}"
    return f"{tool}-{Path(spec['options']['file']).stem}"


def _progress_events(reporter):
    """A tool's `progress(done, total, what)` as one `started` event and `progress` events (at most one per
    percent: a large model has hundreds of modules)."""
    state = {"started": False, "shown": -1}

    def progress(done: int, total: int, what: str) -> None:
        if not state["started"]:
            reporter.event("started", total=total, step=0)
            state["started"] = True
        percent = done * 100 // max(total, 1)
        if percent != state["shown"] or done >= total:
            state["shown"] = percent
            reporter.event("progress", step=done, total=total, what=what)

    return progress


def _paths(options: dict) -> dict:
    """The stored options with paths as Paths again."""
    out = dict(options)
    for name, value in options.items():
        if name == "loras":
            out[name] = [(Path(path), float(weight)) for path, weight in value]
        elif value is not None and isinstance(value, str) and name in ("file", "base", "tuned", "model_config"):
            out[name] = Path(value)
    return out


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def run_tool(kind: str, options: dict, output: dict | None, reporter) -> dict:
    """Run the tool of `kind` with the stored `options` (writing to the planned `output`); the job's result:
    `task`, `tool`, `output` (the file written; None for info), `summary` and the tool's own numbers."""
    tool = kind.removeprefix("lora_")
    o = _paths(options)
    progress = _progress_events(reporter)
    where = {"out_dir": Path(output["folder"]), "name": output["stem"]} if output else {}
    if tool == "info":
        from shared.sd.lora_tools.info import info_text, lora_info

        progress(0, 1, o["file"].name)
        info = _jsonable(lora_info(o["file"]))
        progress(1, 1, o["file"].name)
        text = info_text(info)
        reporter.log(text)
        return {"task": kind, "tool": tool, "output": None, "summary": text.splitlines()[0], "info": info}
    if tool == "resize":
        from shared.sd.lora_tools.resize import resize_lora

        result = resize_lora(o["file"], rank=o["rank"], energy=o["energy"], progress=progress, **where)
    elif tool == "merge" and o["base"] is not None:
        from shared.sd.lora_tools.merge import merge_into_checkpoint

        result = merge_into_checkpoint(o["base"], o["loras"], model_config=o["model_config"], progress=progress,
                                       **where)
    elif tool == "merge":
        from shared.sd.lora_tools.merge import merge_loras

        result = merge_loras(o["loras"], mode=o["mode"], rank=o["rank"], model_config=o["model_config"],
                             progress=progress, **where)
    elif tool == "extract":
        from shared.sd.lora_tools.extract import extract_lora

        result = extract_lora(o["base"], o["tuned"], rank=o["rank"], conv_rank=o["conv_rank"],
                              text_encoder=o["text_encoder"], min_diff=o["min_diff"], model_config=o["model_config"],
                              progress=progress, **where)
    else:
        from shared.sd.lora_tools.convert import convert_lora

        progress(0, 1, o["file"].name)
        result = convert_lora(o["file"], to=o["to"], arch=o["arch"], model_config=o["model_config"], **where)
        progress(1, 1, o["file"].name)
    summary = result.summary()
    reporter.log(summary)
    numbers = {k: v for k, v in _jsonable(asdict(result)).items() if k != "path"}  # e.g. kept_energy, modules
    return {**numbers, "task": kind, "tool": tool, "output": str(result.path), "summary": summary}
