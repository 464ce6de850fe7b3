"""The LoRA key layout on the real, full-size SDXL architecture (built on the meta device)."""

import json
from importlib import resources

import torch

from shared.images.lora import inject_lora, kohya_text_encoder_targets, kohya_unet_targets
from shared.sd.kohya_export import model_lora_tensors


def _config(*parts):
    return json.loads((resources.files("shared.sd") / "model_configs" / "sdxl").joinpath(*parts).read_text())


def test_full_size_sdxl_has_kohyas_722_unet_and_264_text_encoder_modules():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("unet", "config.json"))
        te1 = CLIPTextModel(CLIPTextConfig(**_config("text_encoder", "config.json")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2", "config.json")))
    unet_targets = kohya_unet_targets(unet)
    te_targets = [kohya_text_encoder_targets(te1), kohya_text_encoder_targets(te2)]
    assert len(unet_targets) == 722
    assert [len(t) for t in te_targets] == [72, 192]  # 264 together
    with torch.device("meta"):
        inject_lora(unet, unet_targets, rank=4, alpha=4, dropout=0.0, init="default")
        for encoder, targets in zip((te1, te2), te_targets):
            inject_lora(encoder, targets, rank=4, alpha=4, dropout=0.0, init="default")
    assert unet.down_blocks[1].attentions[0].proj_in.lora_A["default"].weight.shape == (4, 640)  # Linear in SDXL

    tensors = model_lora_tensors("sdxl", unet, [te1, te2])
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert len(modules) == 722 + 264
    # the names A1111, Forge and ComfyUI map for SDXL: LDM module names (docs/sd-training.md)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "lora_unet_output_blocks_0_1_proj_out",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ):
        assert name in modules, name
    assert not any(m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for m in modules)

    # diffusers maps every one of these LDM names back onto the UNet's blocks
    state = {k: torch.ones(()) if k.endswith(".alpha") else torch.empty(0) for k in tensors}
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    assert len(converted) == 2 * (722 + 264)
