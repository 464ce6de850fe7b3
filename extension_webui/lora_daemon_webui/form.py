"""The tab's form: which settings it shows (generated from their declarations in shared/schema) and how
its values become the daemon's `submit` config (the keys of a `train --config` YAML file).

The basic settings sit in the main form, every other SD setting in the advanced section, grouped as
docs/config.md groups them, and the Flux files (from the WebUI's models/VAE and models/text_encoder)
and Flux settings in a Flux section; each field's default, limits and help come from its declaration, and a
wrong value is named with the field's label and the declared rule. The daemon checks the rest (unknown
keys in the YAML box, missing files, folders outside its allowed roots, the model's own rules) and its
one-line message is shown as it comes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .bridge import schema

CAPTION_AUTO = "auto: metadata.csv if present, else .txt"
CAPTION_CSV = "metadata.csv"
CAPTION_TXT = ".txt beside each image"
CAPTION_CHOICES = [CAPTION_AUTO, CAPTION_CSV, CAPTION_TXT]

# the label job's options as the tab labels its fields: the daemon's errors then name them
LABEL_FIELD_NAMES = {"input_dir": "Dataset folder", "fmt": "Captions", "model": "CLIP model",
                     "weights": "CLIP weights", "trigger": "Trigger word"}


class FormError(ValueError):
    """A field of the form is empty or wrong; the message names the field as the tab labels it."""


def basic_settings() -> list:
    return schema.form_settings(schema.SD, schema.BASIC)


def advanced_settings() -> list:
    return schema.form_settings(schema.SD, "advanced")


def flux_settings() -> list:
    """The Flux-only settings (the Flux section of the form): sent, like the advanced ones, only where
    they differ from the default, so an SD job never gets one."""
    return [s for s in schema.for_task(schema.FLUX) if s.tasks == schema.FLUX_ONLY and s.form.level in
            (schema.BASIC, "advanced")]


def model_file_settings() -> list:
    """The model files the tab offers from the WebUI's own folders (Flux's ae, CLIP-L, T5): a host-filled
    path whose widget names the kind of folder."""
    return [s for s in schema.for_task(schema.FLUX) if s.form.level == "host" and s.form.widget in
            ("vae", "text_encoder")]


def widget_settings() -> list:
    """The settings the tab has a field for, in the order the Train handler receives their values."""
    return [*basic_settings(), *advanced_settings(), *flux_settings()]


def field_info(setting) -> str:
    """The help line under a field: what it does and its rule."""
    rule = setting.rule_text()
    unset = schema.unset_number(setting)
    if unset is not None:
        rule = f"{unset}: not set" + (f"; else {rule}" if rule else "")
    return f"{setting.help} ({rule})" if rule and setting.choices is None else setting.help


def _empty(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def field_value(setting, raw: Any, *, required: bool = False) -> Any:
    """A field's value checked against its declaration; None when it is not set."""
    if setting.form.widget == "lines" and isinstance(raw, str):
        raw = [line.strip() for line in raw.splitlines() if line.strip()] or None
    if _empty(raw) or raw == schema.unset_number(setting):
        if required:
            raise FormError(f"{setting.label}: enter a number" if setting.type in (int, float)
                            else f"{setting.label}: enter a value")
        return None
    try:
        return schema.coerce(setting, raw)
    except schema.SettingError as exc:
        raise FormError(f"{setting.label}: {exc.problem}") from None


def parse_advanced(text: str | None) -> dict:
    """The advanced section's YAML box: `key: value` lines. Empty is fine."""
    if not text or not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise FormError(f"Advanced settings{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FormError("Advanced settings: expected `key: value` lines, one per line")
    return {str(k): v for k, v in data.items()}


def build_config(*, base_model: str | None, dataset: str | None, caption_source: str, output_name: str | None,
                 settings: dict[str, Any], advanced: str | None, deploy_dir: str | Path | None,
                 base_dir: Path, model_files: dict[str, str | None] | None = None) -> dict:
    """The config dict to submit. `settings` holds the fields' values by setting name: the basic ones are
    always sent (with a preset chosen, only where they differ from the default, so the preset's values
    apply), the advanced and Flux ones only where they differ from the default; `model_files` the chosen
    Flux files (sent when chosen). The YAML box is applied last, so a pasted full config wins."""
    if not base_model or not str(base_model).strip():
        raise FormError("Base model: choose a checkpoint or enter the path of a model file")
    if not dataset or not str(dataset).strip():
        raise FormError("Dataset folder: enter the folder that holds your images")
    if not output_name or not output_name.strip():
        raise FormError("Output name: enter a name for the LoRA (it becomes <lora:NAME:0.8>)")
    dataset = str(dataset).strip()
    config: dict = {
        "base_model": str(base_model).strip(),
        "train_data_dir": dataset,
        "output_name": field_value(schema.TRAIN["output_name"], output_name.strip()),
    }
    basic = {}
    for setting in basic_settings():
        value = field_value(setting, settings.get(setting.name), required=not setting.optional)
        if value is not None:
            basic[setting.name] = value
    config.update(schema.presets.form_values(basic, schema.TRAIN))  # with a preset: defaults give way to it
    for setting in [*advanced_settings(), *flux_settings()]:
        value = field_value(setting, settings.get(setting.name))
        default = list(setting.default) if setting.type is list and setting.default is not None else setting.default
        if value is not None and value != default:
            config[setting.name] = value
    config.update({key: path for key, path in (model_files or {}).items() if path})
    folder = Path(dataset).expanduser()
    folder = folder if folder.is_absolute() else Path(base_dir) / folder
    if caption_source == CAPTION_CSV:
        config["metadata_path"] = str(folder / "metadata.csv")
    elif caption_source == CAPTION_TXT and (folder / "metadata.csv").is_file():
        raise FormError(f"Caption source: {folder / 'metadata.csv'} exists and the trainer reads it first; "
                        "choose metadata.csv, or rename that file to use the .txt captions")
    if deploy_dir:
        config["deploy_dir"] = str(deploy_dir)
    config.update(parse_advanced(advanced))
    return config


def build_label_options(*, dataset: str | None, caption_source: str, clip_model: str | None,
                        clip_weights: str | None, trigger: str | None, base_dir: Path) -> dict:
    """The options of a daemon auto-label job (`submit` kind "label") for the dataset folder.

    Captions go where the chosen caption source reads them: `.txt` files for ".txt", else
    metadata.csv. Existing captions are kept (the daemon's labeller only fills in missing ones)."""
    if not dataset or not str(dataset).strip():
        raise FormError("Dataset folder: enter the folder that holds your images")
    folder = Path(str(dataset).strip()).expanduser()
    folder = folder if folder.is_absolute() else Path(base_dir) / folder
    options: dict = {"input_dir": str(folder), "format": "txt" if caption_source == CAPTION_TXT else "csv",
                     "field_names": LABEL_FIELD_NAMES}
    if clip_model and clip_model.strip():
        options["model"] = clip_model.strip()
    if clip_weights and clip_weights.strip():
        options["weights"] = str(Path(clip_weights.strip()).expanduser())
    if trigger and trigger.strip():
        if "\n" in trigger.strip():
            raise FormError("Trigger word: one line only")
        options["trigger"] = trigger.strip()
    return options
