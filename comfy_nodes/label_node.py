"""The "Auto-label dataset" node: caption a folder with CLIP as a daemon job, before Train LoRA.

The job runs in the daemon's queue like training (so the GPU is shared in order), fills in only the
images that have no caption yet (unless overwrite, which keeps a backup), and passes the folder on,
so its output can feed Train LoRA's dataset_folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import host
from .daemon_job import TrainingFailed, connect, run_job

log = logging.getLogger("lora_daemon.comfy")

FORMATS = {"metadata.csv": "csv", ".txt": "txt"}
# the label job's options as this node's inputs are called: its errors then name them
FIELD_NAMES = {"input_dir": "dataset_folder", "fmt": "caption_format", "model": "clip_model",
               "weights": "clip_weights", "trigger": "trigger", "overwrite": "overwrite"}


def label_options(dataset_folder: str, caption_format: str, clip_model: str, clip_weights: str, trigger: str,
                  overwrite: bool) -> dict:
    """The daemon label job's options; relative folders are read from ComfyUI's folder."""
    if not dataset_folder or not dataset_folder.strip():
        raise TrainingFailed("dataset_folder: enter the folder that holds your images")
    folder = Path(dataset_folder.strip()).expanduser()
    folder = folder if folder.is_absolute() else host.base_path() / folder
    options = {"input_dir": str(folder), "format": FORMATS[caption_format], "overwrite": bool(overwrite),
               "field_names": FIELD_NAMES}
    if clip_model.strip():
        options["model"] = clip_model.strip()
    if clip_weights.strip():
        options["weights"] = str(Path(clip_weights.strip()).expanduser())
    if trigger.strip():
        options["trigger"] = trigger.strip()
    return options


class AutoLabelDataset:
    DESCRIPTION = ("Caption the images of a folder with CLIP (open_clip, local weights only) on the lora-daemon, "
                   "writing metadata.csv or .txt captions. Existing captions are kept unless overwrite.")
    CATEGORY = "loaders/lora-daemon"
    FUNCTION = "label"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("dataset_folder", "summary")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset_folder": ("STRING", {"default": "", "tooltip": "Folder of images (relative: ComfyUI's folder)."}),
                "caption_format": (list(FORMATS), {"default": "metadata.csv"}),
                "clip_model": ("STRING", {"default": "ViT-B-32",
                                          "tooltip": "open_clip architecture, or a model config .json"}),
                "clip_weights": ("STRING", {"default": "", "tooltip": "open_clip checkpoint file; empty: a model "
                                            "already in the local Hugging Face cache. Nothing is downloaded."}),
                "trigger": ("STRING", {"default": "", "tooltip": "Put first in every caption."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Relabel every image (the old captions "
                                          "are backed up)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def label(self, dataset_folder, caption_format, clip_model, clip_weights, trigger, overwrite, unique_id=None):
        options = label_options(dataset_folder, caption_format, clip_model, clip_weights, trigger, overwrite)
        client = connect()
        try:
            bar = host.progress_bar(1, unique_id)

            def on_event(event: dict) -> None:
                data = event.get("data") or {}
                if event["kind"] == "progress":
                    bar.update_absolute(data["step"], data["total"])

            result = run_job(client, options, base_dir=host.base_path(), deploy_dirs=[], kind="label",
                             source="ComfyUI Auto-label node", on_submitted=lambda job: None, on_event=on_event)
        finally:
            client.close()
        summary = (f"labelled {len(result.get('captions') or {})} images, kept {len(result.get('kept') or [])} "
                   f"existing captions: {result.get('output')}")
        if result.get("unreadable"):
            summary += f"; could not read {len(result['unreadable'])} images"
        log.info("lora-daemon: %s", summary)
        return (options["input_dir"], summary)
