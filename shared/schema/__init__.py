"""Every job setting in one place: declared by section (one module each), read by everything else.

    from shared.schema import TRAIN, LABEL, coerce_config

`TRAIN` holds the training settings (the keys of a `train --config` YAML file and `TrainConfig`'s
fields), `LABEL` the auto-label job's options, `LORA_TOOLS` each LoRA tool job's (by kind). Generated
from them, never restated: `TrainConfig` (shared/config.py), the pre-flight's checks and messages
(shared/preflight.py), the WebUI tab's and the ComfyUI node's inputs, the job-config JSON Schema
(`python -m daemon schema`, daemon/protocol.schema.json) and docs/config.md.

A new setting is one `Setting(...)` line in its section's module; a new section is a module with
`SECTION`, `SETTINGS` and `RULES`, named in `_TRAIN_SECTIONS` below. Everything here reads the tables
when it is called, so a changed declaration shows everywhere at once.

Standard library only, relative imports only (the hosts load this package under a private name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import (
    blocks,
    data,
    ema,
    evaluation,
    flux,
    images,
    label,
    launch,
    llm,
    llm_deploy,
    lora,
    lora_tools,
    masks,
    memory,
    model,
    network,
    optimizer,
    output,
    preference,
    presets,
    regularisation,
    samples,
    training,
    validation,
)
from .setting import (
    BASIC,
    COMMON,
    FLUX,
    FLUX_ONLY,
    IMAGES,
    LABEL_ONLY,
    LLM,
    LLM_ONLY,
    SD,
    SD_LLM,
    SD_ONLY,
    TASK_NAMES,
    Form,
    Rule,
    Setting,
    SettingError,
    coerce,
    did_you_mean,
)

__all__ = ["BASIC", "COMMON", "FAMILY_RULES", "FLUX", "FLUX_ONLY", "IMAGES", "JOB_KINDS", "LABEL", "LABEL_ONLY", "LLM",
           "LLM_ONLY", "LORA_TOOLS", "RULES", "SD", "SD_LLM", "SD_ONLY", "SECTIONS", "TASK_NAMES", "TRAIN", "Form", "Rule",
           "Setting", "SettingError", "canonical", "coerce", "coerce_config", "for_task", "form_settings", "job_table",
           "unset_number"]

# `presets` last: its field is the last of the hosts' basic inputs, so a saved ComfyUI workflow's widget values
# (stored by position) keep their places
_TRAIN_SECTIONS = (model, data, regularisation, validation, lora, network, blocks, training, optimizer, ema, memory,
                   images, masks, samples, evaluation, output, llm, llm_deploy, preference, flux, launch, presets)


def _table(modules) -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for module in modules:
        for setting in module.SETTINGS:
            if setting.name in table:
                raise AssertionError(f"setting {setting.name} is declared twice")  # a bug in a declaration
            table[setting.name] = replace(setting, section=module.SECTION)
    return table


TRAIN: dict[str, Setting] = _table(_TRAIN_SECTIONS)
LABEL: dict[str, Setting] = _table((label,))
RULES: list[Rule] = [rule for module in _TRAIN_SECTIONS for rule in module.RULES if not rule.family]
FAMILY_RULES: list[Rule] = [rule for module in _TRAIN_SECTIONS for rule in module.RULES if rule.family]
SECTIONS: list[str] = [module.SECTION for module in _TRAIN_SECTIONS]
# The LoRA tool jobs: one table of options per kind (lora_resize, ...), each with its own rules
LORA_TOOLS: dict[str, dict[str, Setting]] = {
    kind: {s.name: replace(s, section=lora_tools.SECTION) for s in settings}
    for kind, settings in lora_tools.SETTINGS.items()
}
JOB_KINDS = ("train", "label", *LORA_TOOLS)  # what a `submit` may ask for


def job_table(kind: str) -> dict[str, Setting]:
    """The settings of a job of `kind` (train, label or a LoRA tool's kind)."""
    if kind == "train":
        return TRAIN
    return LABEL if kind == "label" else LORA_TOOLS[kind]


def for_task(task: str, table: Mapping[str, Setting] | None = None) -> list[Setting]:
    """The settings a job of `task` (sd, flux, llm, label) reads, in declaration order."""
    table = LABEL if task == "label" else (table or TRAIN)
    return [s for s in table.values() if task in s.tasks]


def form_settings(task: str, level: str) -> list[Setting]:
    """The settings a host's form shows at `level` (basic, advanced) for jobs of `task`."""
    return [s for s in for_task(task) if s.form.level == level]


def unset_number(setting: Setting) -> int | None:
    """What stands for "not set" in a number box that cannot be empty: 0, for an optional whole number
    that must otherwise be at least 1 (max_train_steps); else None."""
    if setting.optional and setting.type is int and setting.minimum is not None and setting.minimum >= 1:
        return 0
    return None


def coerce_config(data: Mapping[str, Any], *, source: str, base_dir: Path | None = None,
                  origins: Mapping[str, str] | None = None, require_absolute: bool = False,
                  kind: str = "train", only_given: bool = False) -> dict[str, Any]:
    """Every setting's value (given, else its default) from a mapping of keys, checked against the
    declarations and the cross-field rules. No file is touched. Each message names the key and where its
    value came from: `origins[key]` (e.g. `--set lora_rank=0`), else `source` (the file or client).
    `only_given` checks just the given keys (no required keys, no cross-field rules)."""
    table = job_table(kind)
    rules = RULES if kind == "train" else lora_tools.RULES.get(kind, ())
    origins = origins or {}

    def where(key: str) -> str:
        return origins.get(key, source)

    what = {"train": "key", "label": "label option"}.get(kind, f"{kind} option")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        setting = table.get(key) if isinstance(key, str) else None
        if setting is None:
            raise ConfigError(f"{where(str(key))}: unknown {what} {str(key)!r:.80}{did_you_mean(str(key), table)}")
        values[key] = coerce(setting, raw, where=where(key), base_dir=base_dir, require_absolute=require_absolute)
    if only_given:
        return values
    for key, setting in table.items():
        if values.get(key) is None and setting.required:
            raise ConfigError(f"{where(key)}: missing required {what} {key!r} ({setting.help})")
        # a list's default is declared as a tuple (a dataclass default must not be mutable); a job gets a list
        values.setdefault(key, list(setting.default) if isinstance(setting.default, tuple) else setting.default)
    for rule in rules:
        problem = rule.check(values)
        if problem:
            given = [k for k in rule.keys if k in origins]
            raise ConfigError(f"{where(given[0]) if given else source}: {problem}")
    return values


def canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able values (paths as text): what a job stores and its worker and ranks rebuild from."""
    return {k: str(v) if isinstance(v, Path) else (list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v)
            for k, v in values.items()}
