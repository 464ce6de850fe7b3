"""As the built-in Lora extension's networks.py: the list of LoRA files the WebUI offers."""

import glob
import os

from modules import shared
from modules.record import record

available_networks = {}


def list_available_networks():
    available_networks.clear()
    for filename in glob.glob(os.path.join(shared.cmd_opts.lora_dir, "**", "*.safetensors"), recursive=True):
        available_networks[os.path.splitext(os.path.basename(filename))[0]] = filename
    record("list_available_networks", names=sorted(available_networks))
