"""Smaller guarantees of the slice: diffusers folders load, gaussian init, the network guard bites."""

import socket

import pytest
import torch

from shared.fixtures.tiny_sd import build_tiny_sd15_components
from shared.images.lora import inject_lora, kohya_unet_targets
from shared.sd.base_model import load_sd_model


def test_diffusers_folder_loads(tmp_path):
    unet, vae, te = build_tiny_sd15_components(1)
    folder = tmp_path / "tiny-diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    from importlib import resources

    src = resources.files("shared.sd") / "model_configs" / "sd15"
    (folder / "scheduler" / "scheduler_config.json").write_text((src / "scheduler" / "scheduler_config.json").read_text())
    (folder / "model_index.json").write_text((src / "model_index.json").read_text())
    model = load_sd_model(folder)
    assert model.arch == "sd1"
    a, b = model.unet.state_dict(), unet.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert model.tokenizers[0]("a cat").input_ids[0] == 49406


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_init(init):
    unet, _, _ = build_tiny_sd15_components(0)
    torch.manual_seed(0)
    params = inject_lora(unet, kohya_unet_targets(unet), rank=8, alpha=16, dropout=0.1, init=init)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    module = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0  # B starts at zero: the LoRA starts as a no-op
    if init == "gaussian":
        # PEFT's gaussian init: A ~ N(0, 1/r)
        big = torch.cat([m.lora_A["default"].weight.flatten() for m in unet.modules() if hasattr(m, "lora_A")])
        assert abs(big.std().item() - 1 / 8) < 0.02
    assert module.scaling["default"] == 2.0  # alpha / rank
    assert a.shape == (8, 32)


def test_network_guard_blocks_outside_addresses():
    sock = socket.socket()
    try:
        with pytest.raises(OSError, match="network access blocked"):
            sock.connect(("93.184.216.34", 443))
    finally:
        sock.close()


def test_published_files_are_readable_by_other_users(tmp_path):
    import os

    from safetensors.torch import save_file

    from shared.files import publish_new

    path = publish_new(tmp_path, "x", ".safetensors", lambda t, name: save_file({"a": torch.zeros(1)}, str(t)))
    assert os.stat(path).st_mode & 0o777 == 0o644
    again = publish_new(tmp_path, "x", ".safetensors", lambda t, name: save_file({"a": torch.ones(1)}, str(t)))
    assert again.name == "x_2.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
