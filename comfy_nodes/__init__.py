"""lora-daemon's ComfyUI node pack: "Train LoRA" and "Train Flux LoRA" (backed by the trainer daemon),
"LoRA job status" and "Auto-label dataset".

Install with `python install.py --comfyui PATH` (it links this folder into ComfyUI's `custom_nodes/`,
or copies it where links cannot be made; see docs/comfyui.md). ComfyUI loads it by file location under
a module name made from its path. The repository's thin client comes in through `thin.py` under a
private package name: nothing named `shared` or `daemon` enters ComfyUI's `sys.modules`, and nothing
goes on `sys.path`.

Nothing heavier than the standard library, `websockets` and our thin client is imported here: ComfyUI
has torch, but the daemon's own dependencies (diffusers, peft, ...) live in the daemon's environment.
"""

from __future__ import annotations

from . import thin  # noqa: F401 - first: every node module uses it
from .label_node import AutoLabelDataset
from .status_node import LoraJobStatus
from .train_node import TrainFluxLora, TrainLora

NODE_CLASS_MAPPINGS = {
    "LoraDaemonTrainLoRA": TrainLora,
    "LoraDaemonTrainFluxLoRA": TrainFluxLora,
    "LoraDaemonJobStatus": LoraJobStatus,
    "LoraDaemonAutoLabel": AutoLabelDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraDaemonTrainLoRA": "Train LoRA (lora-daemon)",
    "LoraDaemonTrainFluxLoRA": "Train Flux LoRA (lora-daemon)",
    "LoraDaemonJobStatus": "LoRA job status (lora-daemon)",
    "LoraDaemonAutoLabel": "Auto-label dataset (lora-daemon)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
