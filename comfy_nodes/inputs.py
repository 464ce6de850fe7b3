"""The training nodes' setting inputs, generated from the declarations (shared/schema): the basic
settings of the node's task become widgets with the declared default, limits and help; the model files
a task reads from ComfyUI's own folders (Flux's ae, CLIP-L, T5) become combos of those folders;
everything else goes in the advanced YAML box. Nothing here names a setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import host
from .thin import schema

# ComfyUI's frontend gives every INT input named `seed` or `noise_seed` a "control after generate" widget
# that randomizes the value after each Run (Comfy-Org/ComfyUI_frontend: useIntWidget.ts,
# `inputSpec.control_after_generate ?? ['seed', 'noise_seed'].includes(inputSpec.name)`, default type
# 'randomize'; litegraphUtil.ts's migrateWidgetsValues counts the extra widget for those names even when
# `control_after_generate` is false). A training seed that changes on every Run trains a new LoRA each
# time, so an input of ours never takes those names; no input of ours asks for the control either.
SAMPLER_SEED_NAMES = ("seed", "noise_seed")
INT_MAX = 2**53  # the largest integer the frontend's numbers hold exactly; without a max it would cap at 2048


def basic_settings(task: str = schema.SD) -> list:
    return schema.form_settings(task, schema.BASIC)


def model_file_settings(task: str) -> list:
    """The path settings a host fills from one of its model folders (Form level host, widget the kind)."""
    return [s for s in schema.for_task(task) if s.form.level == "host" and s.form.widget in host.MODEL_FOLDERS]


def model_file_inputs(task: str) -> dict[str, tuple]:
    """A combo of ComfyUI's folder for each model-file setting of `task`."""
    return {s.name: (host.model_names(s.form.widget), {"tooltip": s.help}) for s in model_file_settings(task)}


def model_files(values: dict[str, Any], task: str) -> dict[str, Path]:
    """{setting: file} for the chosen model-file inputs (ComfyUI's own lookup of each name)."""
    return {s.name: host.model_path(s.form.widget, values[s.name], s.name) for s in model_file_settings(task)
            if values.get(s.name)}


def input_name(setting) -> str:
    return f"training_{setting.name}" if setting.name in SAMPLER_SEED_NAMES else setting.name


def _tooltip(setting) -> str:
    rule = setting.rule_text()
    unset = schema.unset_number(setting)
    if unset is not None:
        rule = f"{unset}: not set; else {rule}" if rule else f"{unset}: not set"
    return f"{setting.help} ({rule})" if rule else setting.help


def widget(setting) -> tuple[Any, dict]:
    """ComfyUI's (type, options) for one setting."""
    options: dict[str, Any] = {"tooltip": _tooltip(setting)}
    unset = schema.unset_number(setting)
    default = setting.default if setting.default is not None else (unset if unset is not None else "")
    if setting.choices is not None:
        return list(setting.choices), {**options, "default": default}
    if setting.type is bool:
        return "BOOLEAN", {**options, "default": bool(default)}
    if setting.type in (int, float):
        low = unset if unset is not None else setting.minimum
        high = setting.maximum if setting.maximum is not None else INT_MAX
        options.update(default=default, max=high, **({"min": low} if low is not None else {}))
        if setting.type is int:
            return "INT", {**options, "step": setting.multiple_of or 1}
        return "FLOAT", {**options, "step": setting.form.step or 0.01, "round": False}
    return "STRING", {**options, "default": str(default), "multiline": setting.form.widget == "lines"}


def inputs(task: str = schema.SD) -> dict[str, tuple]:
    return {input_name(s): widget(s) for s in basic_settings(task)}


def config_values(values: dict[str, Any], task: str = schema.SD) -> dict[str, Any]:
    """{config key: value} from the node's input values (by input name); "not set" leaves the key out, and so
    does a widget at its default when a preset is chosen (the preset's value applies)."""
    out = {}
    for setting in basic_settings(task):
        name = input_name(setting)
        if name not in values:
            continue
        value = values[name]
        if value == schema.unset_number(setting) or (value == "" and setting.type is not str):
            continue
        if setting.type is Path or setting.type is list:
            value = str(value)
        out[setting.name] = value
    return schema.presets.form_values(out, schema.TRAIN)  # with a preset: widgets at their default give way
