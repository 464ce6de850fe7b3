"""A held-out validation set (SD) and its loss at fixed timesteps and noise, at each checkpoint and at the
end (the `eval_loss` of the `checkpoint` event and TensorBoard's eval/loss)."""

from pathlib import Path

from .setting import SD_ONLY, Rule, Setting

SECTION = "Validation (SD)"
SETTINGS = (
    Setting("validation_split", float, 0.0, "Fraction of the training images held out for the validation loss "
            "(0.1 = 10%, at least one image; 0: none). Chosen with validation_seed; regularisation images are "
            "never held out.", tasks=SD_ONLY, minimum=0, maximum=1, exclusive_maximum=True),
    Setting("validation_dir", Path, None, "A folder of validation images instead of a split (read like "
            "train_data_dir; repeats are ignored).", tasks=SD_ONLY, optional=True, path="read", exists="dir"),
    Setting("validation_seed", int, None, "Seed of the split and of the validation noise (default: seed).",
            tasks=SD_ONLY, optional=True, minimum=0, maximum=2**32 - 1),
    Setting("validation_timesteps", int, 4, "Timesteps each validation image is scored at, evenly spaced "
            "(4: 200, 400, 600, 800 of 1000, as kohya's validation). Each costs one UNet forward per image.",
            tasks=SD_ONLY, minimum=1, maximum=100),
)


def _split_or_folder(v) -> str | None:
    if v["validation_split"] > 0 and v["validation_dir"] is not None:
        return "validation_split and validation_dir: give one (a share of the training images, or a folder)"
    return None


def _not_the_training_folder(v) -> str | None:
    folder, train = v["validation_dir"], v["train_data_dir"]
    if folder is not None and train is not None and Path(folder) == Path(train):
        return ("validation_dir is train_data_dir: validation images must not be trained on; use validation_split "
                "to hold some of them out, or give another folder")
    return None


RULES = (Rule(("validation_split", "validation_dir"), _split_or_folder, tasks=SD_ONLY),
         Rule(("validation_dir", "train_data_dir"), _not_the_training_folder, tasks=SD_ONLY))
