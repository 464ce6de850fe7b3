"""The auto-label job (`submit` with kind "label"): caption a folder with CLIP. The names are
`shared.autolabel.labeller.label_folder`'s keyword arguments."""

from pathlib import Path

from .setting import LABEL_ONLY, Form, Setting
from .training import DEVICE_HELP, DEVICE_PATTERN

SECTION = "Auto-label job"
_HOST = Form("host")
SETTINGS = tuple(
    Setting(name, kind, default, help, tasks=LABEL_ONLY, form=_HOST, **rule) for name, kind, default, help, rule in (
        ("input_dir", Path, None, "The folder of images.", dict(required=True, path="read", exists="dir")),
        ("output", Path, None, "metadata.csv to write or merge into (default: <input_dir>/metadata.csv); with fmt "
         "txt, the folder for the .txt files (default: input_dir).", dict(optional=True, path="write")),
        ("fmt", str, "csv", "csv (metadata.csv) or txt (a .txt caption beside each image); `format` is read as "
         "this too.", dict(choices=("csv", "txt"))),
        ("trigger", str, None, "A trigger word put first in every caption.", dict(optional=True)),
        ("vocab_file", Path, None, "Your own phrases: .txt (one a line, [category] lines) or .json.",
         dict(optional=True, path="read", exists="file")),
        ("builtin_vocab", bool, True, "Use the built-in phrase lists too.", {}),
        ("top_k", int, 2, "At most this many phrases per category.", dict(minimum=1, maximum=100)),
        ("threshold", float, 0.1, "Keep a phrase if CLIP gives it at least this probability within its category.",
         dict(minimum=0, maximum=1)),
        ("batch_size", int, 16, "Images per batch.", dict(minimum=1, maximum=4096)),
        ("device", str, "auto", f"{DEVICE_HELP}.", dict(pattern=DEVICE_PATTERN, pattern_help=DEVICE_HELP)),
        ("model", str, None, "open_clip architecture or a model config .json (default: the labeller's).",
         dict(optional=True)),
        ("pretrained", str, None, "A pretrained tag already in the local cache, or a checkpoint path.",
         dict(optional=True)),
        ("weights", Path, None, "An open_clip checkpoint file or a folder with open_clip_config.json.",
         dict(optional=True, path="read", exists="any")),
        ("overwrite", bool, False, "Replace existing captions (the old ones are backed up).", {}),
    )
)
RULES = ()
