"""Auto-label: CLIP captions for a folder of images (`python -m daemon label`).

`label_folder` is the entry point for the CLI and for a daemon job; see `labeller.py`.
"""

from shared.autolabel.labeller import LabelResult, label_folder

__all__ = ["LabelResult", "label_folder"]
