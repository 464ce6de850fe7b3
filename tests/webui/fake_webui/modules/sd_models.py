"""As modules/sd_models.py: the checkpoint list, select_checkpoint, and the model moves the tab asks for.

No real model is loaded: `model_data.sd_model` is a placeholder object, and unload/send record the call
(and whether the queue lock was held) for the tests."""

import glob
import os

from modules import call_queue, paths, shared
from modules.record import record

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        name = os.path.relpath(abspath, model_path) if abspath.startswith(model_path) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.name, self.title]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for filename in sorted(glob.glob(os.path.join(model_path, "**", "*.safetensors"), recursive=True)
                           + glob.glob(os.path.join(model_path, "**", "*.ckpt"), recursive=True)):
        CheckpointInfo(filename).register()


def select_checkpoint():
    """Raises `FileNotFoundError` if no checkpoints are found."""
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    return next(iter(checkpoints_list.values()))


class FakeModel:
    device = "cuda"


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False


model_data = SdModelData()


def send_model_to_cpu(m):
    m.device = "cpu"


def send_model_to_device(m):
    m.device = "cuda"
    record("send_model_to_device", lock_held=call_queue.held_by_me(), device=m.device)


def unload_model_weights(sd_model=None, info=None):
    if sd_model is None:  # the real one reads shared.sd_model here, which loads a model
        record("unload_model_weights_without_model", lock_held=call_queue.held_by_me())
        raise AssertionError("unload_model_weights() without a model would load one first")
    send_model_to_cpu(sd_model)
    record("unload_model_weights", lock_held=call_queue.held_by_me(), device=sd_model.device)
    return sd_model
