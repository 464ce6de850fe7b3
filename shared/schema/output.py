"""Where the LoRA goes, what it is called, and how often the run saves."""

import re
from pathlib import Path, PurePath

from .setting import IMAGES, Form, Rule, Setting

SECTION = "Output"
# A LoRA's name becomes a file name and a `<lora:NAME:w>` alias: a safe alphabet, never hidden.
NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}"
NAME_HELP = "1-100 ASCII letters, digits, '_', '-' or '.', not starting with '.'"

SETTINGS = (
    Setting("output_dir", Path, None, "Folder for the LoRA file and checkpoints.", required=True, path="write",
            form=Form("host")),
    Setting("output_name", str, None, "File name of the LoRA and its <lora:NAME:w> alias. Default: last part of "
            "output_dir.", optional=True, pattern=NAME_PATTERN, pattern_help=NAME_HELP,
            form=Form("host", "Output name")),
    Setting("log_dir", Path, None, "TensorBoard logs. Default: <output_dir>/logs.", optional=True, path="write"),
    Setting("save_steps", int, 500, "Save a checkpoint every N optimizer steps (0: only at the end).", minimum=0,
            maximum=10_000_000),
    Setting("save_last_n", int, 3, "Keep the last N checkpoints and training states (0: keep all).",
            minimum=0, maximum=1_000_000),
    Setting("resume", str, None, "Continue a run from <output_dir>/checkpoints: `latest` (the newest training state; a "
            "fresh start when there is none yet) or a state folder's name such as state-step000200.",
            optional=True),
    Setting("deploy_dir", Path, None, "A host's Lora folder: the finished file is copied there under a name that "
            "never overwrites.", optional=True, path="write", form=Form("host")),
    Setting("preferred_weight", float, 0.8, "The LoRA weight suggested in the sidecar .json.", tasks=IMAGES,
            minimum=-10, maximum=10, form=Form(step=0.05)),
    Setting("description", str, None, "Description for the sidecar .json.", tasks=IMAGES, optional=True),
)


def name_fits(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def derived_name(output_dir, output_name) -> str:
    """The LoRA's name: output_name, else the last part of output_dir."""
    return output_name or PurePath(output_dir).name


def _derived_name_fits(v) -> str | None:
    if v["output_name"] is not None or v["output_dir"] is None:
        return None  # output_name has its own pattern; a missing output_dir is reported as missing
    name = derived_name(v["output_dir"], None)
    if name_fits(name):
        return None
    return (f"output_dir: the LoRA is named after the last part of output_dir ({name!r}), which must be {NAME_HELP}; "
            "set output_name, or end output_dir in such a name")


RULES = (Rule(("output_dir", "output_name"), _derived_name_fits),)
