"""The training data and how captions are read from it."""

from pathlib import Path

from .setting import IMAGES, Form, Setting

SECTION = "Data"
SETTINGS = (
    Setting("train_data_dir", Path, None, "Folder of training images (SD, Flux) or data file/folder (LLM).",
            required=True, path="read", exists="any", form=Form("host", "Dataset folder")),
    Setting("metadata_path", Path, None, "CSV of `file,caption` rows. Default: <train_data_dir>/metadata.csv when "
            "it exists, else one .txt caption beside each image.", tasks=IMAGES, optional=True, path="read",
            exists="file", form=Form("host", "Captions")),
    Setting("caption_extension", str, ".txt", "Caption file suffix beside each image.", tasks=IMAGES,
            pattern=r"\.[A-Za-z0-9_-]{1,16}", pattern_help="a file suffix such as .txt or .caption"),
    Setting("trigger_word", str, None, "Put first in every caption (and in the sidecar's activation text).",
            tasks=IMAGES, optional=True),
    Setting("shuffle_caption", bool, False, "Shuffle comma-separated tags every step (the first keep_tokens stay).",
            tasks=IMAGES),
    Setting("keep_tokens", int, 0, "Tags at the start of a caption that shuffling leaves in place.", tasks=IMAGES,
            minimum=0, maximum=1000),
    Setting("caption_dropout_rate", float, 0.0, "Chance of training a step's image with an empty caption.",
            tasks=IMAGES, minimum=0, maximum=1, exclusive_maximum=True, form=Form(step=0.05)),
)
RULES = ()
