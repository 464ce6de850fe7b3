"""Block control (issue 20): every kohya target of the full-size SD1.5 and SDXL layouts (meta device) lies
in exactly one LDM block; per-block lr weights become optimizer groups; per-block ranks reach injection."""

import json
from importlib import resources

import pytest
import torch

from shared.errors import ConfigError
from shared.fixtures.tiny_sd import build_tiny_sd15_components
from shared.images.lora import inject_lora, kohya_conv_targets, kohya_unet_targets
from shared.sd.blocks import (
    block_lr_weights,
    block_module_ranks,
    block_names,
    block_param_groups,
    module_blocks,
    parse_weights,
)
from shared.sd.lycoris import LycorisSpec, inject_lycoris


def _full_size_unet(name):
    from diffusers import UNet2DConditionModel

    config = json.loads((resources.files("shared.sd") / "model_configs" / name / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(("name", "per_side", "attention_blocks"), [
    ("sd15", 12, {"in1", "in2", "in4", "in5", "in7", "in8", "mid", *(f"out{i}" for i in range(3, 12))}),
    ("sdxl", 9, {"in4", "in5", "in7", "in8", "mid", *(f"out{i}" for i in range(6))}),
])
def test_every_target_of_the_full_size_layouts_has_exactly_one_block(name, per_side, attention_blocks):
    unet = _full_size_unet(name)
    names = block_names(unet.config)
    assert len(names) == 2 * per_side + 1 and names[per_side] == "mid"
    attention, conv = kohya_unet_targets(unet), kohya_conv_targets(unet)
    blocks = module_blocks(attention + conv, unet.config)
    assert set(blocks) == set(attention) | set(conv)  # each target once ...
    assert set(blocks.values()) <= set(names)  # ... in one block of the layout
    assert {blocks[t] for t in attention} == attention_blocks
    assert {blocks[t] for t in conv} == set(names) - {"in0"}  # every ResBlock / resampler block but conv_in's
    if name == "sd15":
        assert blocks["down_blocks.0.attentions.1.proj_in"] == "in2"
        assert blocks["down_blocks.1.downsamplers.0.conv"] == "in6"
        assert blocks["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"] == "out11"
    else:
        assert blocks["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"] == "in8"
        assert blocks["mid_block.attentions.0.proj_out"] == "mid"
        assert blocks["up_blocks.0.upsamplers.0.conv"] == "out2"


def test_kohya_weight_shapes_and_bad_lists():
    assert parse_weights("linear", 3, "k") == [0.0, 0.5, 1.0]
    assert parse_weights("reverse_linear+0.5", 3, "k") == [1.5, 1.0, 0.5]
    assert parse_weights("zeros", 2, "k") == [0.0, 0.0]
    assert parse_weights("1,0.5, 0", 3, "k") == [1.0, 0.5, 0.0]
    assert parse_weights("sine", 3, "k")[0] == 0.0 and parse_weights("cosine", 3, "k")[0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="down_lr_weight: expected 12 values"):
        block_lr_weights(_full_size_unet("sd15").config, down=[1.0] * 11)
    with pytest.raises(ConfigError, match="k: weights may not be negative"):
        parse_weights([1, -1], 2, "k")


def test_block_lr_groups_and_block_ranks_on_the_tiny_unet():
    unet, _, _ = build_tiny_sd15_components(0)
    n = len(block_names(unet.config)) // 2  # 6 per side in the tiny 2-level layout
    targets = kohya_unet_targets(unet)
    blocks = module_blocks(targets, unet.config)
    dims = [0, 2, 4, 0, 0, 0] + [8] + [0, 0, 0, 4, 4, 4]  # in1 rank 2, in2 rank 4, mid 8, out3-5 rank 4
    ranks = block_module_ranks(blocks, unet.config, dims)
    inject_lora(unet, targets, rank=16, alpha=16, dropout=0.0, init="default", module_ranks=ranks)
    modules = dict(unet.named_modules())
    for target in blocks:
        layer = modules[target]
        expected = ranks[target][0]
        if expected == 0:
            assert not hasattr(layer, "lora_A")
        else:
            assert layer.lora_A["default"].weight.shape[0] == expected
            assert layer.scaling["default"] == pytest.approx(1.0)  # alpha defaults to the block's rank
    weights = block_lr_weights(unet.config, down=[1, 1, 0.5, 1, 1, 1], mid=0.0, up="zeros+1")
    groups = block_param_groups(unet, 1e-3, weights)
    by_block = {g["block"]: g for g in groups}
    assert set(by_block) == {"in1", "in2", "out3", "out4", "out5"}  # mid's weight 0: not trained
    assert by_block["in2"]["lr"] == pytest.approx(5e-4) and by_block["in1"]["lr"] == pytest.approx(1e-3)
    assert not any(p.requires_grad for n_, p in modules["mid_block.attentions.0.proj_in"].named_parameters())
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})  # a parameter in one group only
    assert n == 6


def test_block_groups_cover_lycoris_modules():
    unet, _, _ = build_tiny_sd15_components(0)
    targets = kohya_unet_targets(unet)
    inject_lycoris(unet, targets, LycorisSpec("loha", rank=2, alpha=1), prefix="lora_unet")
    groups = block_param_groups(unet, 1e-3, block_lr_weights(unet.config))
    assert sum(len(g["params"]) for g in groups) == sum(1 for n, p in unet.named_parameters() if p.requires_grad)


# --- through the SD task --------------------------------------------------------------------------


def test_block_ranks_and_learning_rates_through_the_task(sd_config, tmp_path):
    """Tiny SD1.5 blocks: in0..in5, mid, out0..out5 (attention in in1, in2, mid, out3..out5). block_dims
    drops in2 and mid and gives out5 rank 2 (alpha 1); down_lr_weight 0 freezes the input blocks, whose
    up-projections then stay at their zero init in the file; the groups carry lr x factor."""
    import json

    from safetensors import safe_open

    from shared.preflight import load_config
    from shared.sd.task import SDTask
    from shared.train import run_training
    from shared.training.precision import setup_precision
    from tests.test_llm_training import Recorder

    dims = [8, 8, 0, 8, 8, 8, 0, 8, 8, 8, 8, 8, 2]
    alphas = [4.0] * 12 + [1.0]
    values = dict(block_dims=dims, block_alphas=alphas, down_lr_weight="zeros", up_lr_weight="0,0,0,1,1,0.5",
                  learning_rate=1e-2, max_train_steps=3, lora_dropout=0.0, preview=False)
    cfg = load_config(sd_config(**values))
    task = SDTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    groups = {g["block"]: g["lr"] for g in task.param_groups()}
    assert groups == {"out3": 1e-2, "out4": 1e-2, "out5": 5e-3}  # in*: factor 0; mid: no modules left
    result = run_training(cfg)
    with safe_open(str(result.output_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        args = json.loads(f.metadata()["ss_network_args"])
    modules = {k.split(".", 1)[0] for k in tensors}
    assert not any("down_blocks_1_attentions" in m or "mid_block" in m for m in modules)  # in2 / mid: rank 0
    out5 = [m for m in modules if m.startswith("lora_unet_up_blocks_1_attentions_2_")]
    assert out5 and all(tensors[f"{m}.lora_down.weight"].shape[0] == 2 and float(tensors[f"{m}.alpha"]) == 1.0
                        for m in out5)
    frozen = [m for m in modules if m.startswith("lora_unet_down_blocks_0_attentions_")]  # in1, trained at factor 0
    assert frozen and all(not tensors[f"{m}.lora_up.weight"].any() for m in frozen)
    assert all(tensors[f"{m}.lora_up.weight"].any() for m in out5)
    assert args["block_dims"] == ",".join(str(d) for d in dims) and args["down_lr_weight"] == "zeros"


def test_a_wrong_count_is_one_line_before_anything_is_written(sd_config, tmp_path):
    from shared.preflight import load_config
    from shared.train import run_training

    with pytest.raises(ConfigError, match=r"^block_dims: expected 13 values \(one per block\), got 25$"):
        run_training(load_config(sd_config(block_dims=[4] * 25)))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="conv_block_dims sets LoCon's conv ranks: set conv_rank > 0"):
        load_config(sd_config(conv_block_dims=[4] * 13))
    with pytest.raises(ConfigError, match="down_lr_weight: expected a list of numbers or cosine, sine"):
        load_config(sd_config(down_lr_weight="steep"))
