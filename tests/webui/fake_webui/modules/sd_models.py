"""As modules/sd_models.py: the checkpoint list, its titles and aliases, the closest-match lookup,
select_checkpoint, loading (which hashes the checkpoint and retitles it), and the model moves the tab
asks for.

What the tab must cope with, as in the real WebUI: a checkpoint not hashed yet is titled
`name.safetensors`; the first load computes its sha256 and retitles it `name.safetensors [0123456789]`
in `checkpoints_list` (the old title stays only as an alias), and `opts.sd_model_checkpoint` takes the
new title. The WebUI builds its UI while the model loads, so a page may hold the old title.

No real model is loaded: `model_data.sd_model` is a placeholder object, and unload/send record the call
(and whether the queue lock was held) for the tests."""

import glob
import hashlib
import os
import re

from modules import call_queue, hashes, paths, shared
from modules.record import record

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}


def replace_key(d, key, new_key, value):
    """Put `value` under `new_key` where `key` was, keeping the order (the dropdown's order)."""
    had_key = key in d
    order = [new_key if k == key else k for k in d]
    d[new_key] = value
    if not had_key:
        return d
    kept = {k: d[k] for k in order}
    d.clear()
    d.update(kept)
    return d


def model_hash(filename):
    """The old short hash: 8 hex digits of the sha256 of 64 KiB at offset 1 MiB."""
    try:
        with open(filename, "rb") as fh:
            fh.seek(0x100000)
            return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        name = abspath.replace(model_path, "") if abspath.startswith(model_path) else os.path.basename(filename)
        name = name.lstrip("/\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for alias in self.ids:
            checkpoint_aliases[alias] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        if self.shorthash == self.sha256[:10]:
            return self.shorthash
        self.shorthash = self.sha256[:10]
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for filename in sorted(glob.glob(os.path.join(model_path, "**", "*.safetensors"), recursive=True)
                           + glob.glob(os.path.join(model_path, "**", "*.ckpt"), recursive=True)):
        CheckpointInfo(filename).register()


_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    """An alias first; else the shortest title containing the string; else the same without a
    trailing `[hash]` (so a title from before or after hashing still finds its checkpoint)."""
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    for needle in (search_string, _strip_checksum.sub("", search_string)):
        found = sorted((i for i in checkpoints_list.values() if needle in i.title), key=lambda i: len(i.title))
        if found:
            return found[0]
    return None


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


def load_model(checkpoint_info=None):
    """Load the selected checkpoint: hash it (which retitles it) and record its title in the options,
    as load_model_weights does; the model itself is a placeholder."""
    checkpoint_info = checkpoint_info or select_checkpoint()
    checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    model_data.sd_model = FakeModel()
    model_data.was_loaded_at_least_once = True
    record("load_model", title=checkpoint_info.title)
    return model_data.sd_model


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
