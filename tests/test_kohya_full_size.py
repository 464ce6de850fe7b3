"""The LoRA key layout on the real, full-size SD1.5 architecture (built on the meta device)."""

import json
from importlib import resources

from shared.images.lora import inject_lora, kohya_unet_targets


def test_full_size_sd15_has_kohyas_192_unet_modules():
    import torch
    from diffusers import UNet2DConditionModel


    config = json.loads((resources.files("shared.sd") / "model_configs" / "sd15" / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    targets = kohya_unet_targets(unet)
    assert len(targets) == 192
    inject_lora(unet, targets, rank=8, alpha=16, dropout=0.0, init="default")
    modules = {name for name, mod in unet.named_modules() if hasattr(mod, "lora_A")}
    assert modules == set(targets)
    keys = {"lora_unet_" + name.replace(".", "_") for name in modules}
    # names A1111 and ComfyUI map for SD1.5: diffusers module names, '.' -> '_'
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in keys
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in keys
    assert "lora_unet_down_blocks_2_attentions_1_proj_out" in keys
    assert unet.down_blocks[0].attentions[0].proj_in.lora_A["default"].weight.shape == (8, 320, 1, 1)
