"""Stand-in for comfy.utils: ProgressBar with the global hook main.py installs, and load_torch_file."""

from __future__ import annotations

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK  # taken when the bar is made, as in ComfyUI
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    import safetensors.torch

    tensors = safetensors.torch.load_file(ckpt, device=str(device or "cpu"))
    if return_metadata:
        from safetensors import safe_open

        with safe_open(ckpt, framework="pt") as fh:
            return tensors, fh.metadata()
    return tensors
