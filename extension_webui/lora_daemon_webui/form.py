"""Turn the tab's form into the daemon's `submit` config (the keys of a `train --config` YAML file).

Only what a person can get wrong in the form itself is checked here, with the field's label in the
message; the daemon checks the config itself (unknown keys, missing files, folders outside its
allowed roots) and its one-line message is shown as it comes.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

CAPTION_AUTO = "auto: metadata.csv if present, else .txt"
CAPTION_CSV = "metadata.csv"
CAPTION_TXT = ".txt beside each image"
CAPTION_CHOICES = [CAPTION_AUTO, CAPTION_CSV, CAPTION_TXT]

# the label job's options as the tab labels its fields: the daemon's errors then name them
LABEL_FIELD_NAMES = {"input_dir": "Dataset folder", "fmt": "Captions", "model": "CLIP model",
                     "weights": "CLIP weights", "trigger": "Trigger word"}

# keys the form sets; every other TrainConfig key goes in the advanced YAML
FORM_KEYS = ("base_model", "train_data_dir", "metadata_path", "output_name", "lora_rank", "lora_alpha",
             "learning_rate", "epochs", "batch_size", "resolution", "deploy_dir")


class FormError(ValueError):
    """A field of the form is empty or wrong; the message names the field as the tab labels it."""


def _number(label: str, value, *, whole: bool, minimum: float, above: bool = False) -> float | int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FormError(f"{label}: enter a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FormError(f"{label}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise FormError(f"{label}: {value!r} is not a finite number")
    if whole:
        if number != int(number):
            raise FormError(f"{label}: enter a whole number, not {value}")
        number = int(number)
    if number < minimum or (above and number <= minimum):
        raise FormError(f"{label}: must be {'above' if above else 'at least'} {minimum:g}, not {value}")
    return number


def parse_advanced(text: str | None) -> dict:
    """The advanced section: `key: value` lines (YAML). Empty is fine."""
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
                 rank, alpha, learning_rate, epochs, batch_size, resolution, advanced: str | None,
                 deploy_dir: str | Path | None, base_dir: Path) -> dict:
    """The config dict to submit. The advanced YAML is applied last, so a pasted full config wins."""
    if not base_model or not str(base_model).strip():
        raise FormError("Base model: choose a checkpoint or enter the path of a model file")
    if not dataset or not str(dataset).strip():
        raise FormError("Dataset folder: enter the folder that holds your images")
    if not output_name or not output_name.strip():
        raise FormError("Output name: enter a name for the LoRA (it becomes <lora:NAME:0.8>)")
    output_name = output_name.strip()
    if any(ch in output_name for ch in "/\\:<>\"|?*") or output_name in (".", ".."):
        raise FormError(f"Output name: {output_name!r} must be a plain file name (no folders or : < > | ? *)")
    dataset = str(dataset).strip()
    config: dict = {
        "base_model": str(base_model).strip(),
        "train_data_dir": dataset,
        "output_name": output_name,
        "lora_rank": _number("Rank", rank, whole=True, minimum=1),
        "lora_alpha": _number("Alpha", alpha, whole=False, minimum=0, above=True),
        "learning_rate": _number("Learning rate", learning_rate, whole=False, minimum=0, above=True),
        "epochs": _number("Epochs", epochs, whole=True, minimum=1),
        "batch_size": _number("Batch size", batch_size, whole=True, minimum=1),
        "resolution": _number("Resolution", resolution, whole=True, minimum=64),
    }
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
