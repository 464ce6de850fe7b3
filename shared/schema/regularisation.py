"""Regularisation (prior-preservation) images (SD): a second folder trained beside the data set, its
loss weighted by prior_loss_weight, as kohya's reg_data_dir / prior_loss_weight."""

from pathlib import Path

from .setting import SD_ONLY, Rule, Setting

SECTION = "Regularisation images (SD)"
SETTINGS = (
    Setting("reg_data_dir", Path, None, "Folder of regularisation (class) images, read like train_data_dir "
            "(metadata.csv, .txt captions or N_name folders; an image without a caption in an N_name folder is "
            "captioned with the folder's name, e.g. `1_dog` -> `dog`; trigger_word is not added). Each epoch trains "
            "as many of them as training images (kohya's balancing), so an epoch is about twice as long.", tasks=SD_ONLY,
            optional=True, path="read", exists="dir"),
    Setting("prior_loss_weight", float, 1.0, "Weight of a regularisation image's loss against a training image's "
            "(1: equal; 0: they add nothing to the gradient).", tasks=SD_ONLY, minimum=0, maximum=100),
)


def _not_the_training_folder(v) -> str | None:
    reg, train = v["reg_data_dir"], v["train_data_dir"]
    if reg is not None and train is not None and Path(reg) == Path(train):
        return ("reg_data_dir is train_data_dir: regularisation images must be other images (of the class, "
                "without your subject); give their own folder")
    return None


RULES = (Rule(("reg_data_dir", "train_data_dir"), _not_the_training_folder, tasks=SD_ONLY),)
