"""LoHa and LoKr (issue 20): trained through the lycoris-lora modules on kohya's targets of the tiny SD1.5
and SDXL, exported in the LyCORIS layout; every key is mapped by AUTOMATIC1111's and ComfyUI's rules
(restated in tests/host_lora_rules.py) and applying the file the way the hosts do gives the outputs
of the trained model, which differ from the base model's."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.images.lora import kohya_conv_targets, kohya_text_encoder_targets, kohya_unet_targets
from shared.sd.base_model import load_sd_model, read_checkpoint
from shared.sd.kohya_export import lora_metadata, save_lora_file
from shared.sd.lycoris import (
    LycorisSpec,
    inject_sd,
    lycoris_metadata,
    model_lycoris_tensors,
    set_lycoris_weight,
)
from tests import host_lora_rules as hosts
from tests.sd_probe import forward as _forward


def _diffusers_unet_names(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(params=["sd1", "sdxl"])
def arch_paths(request):
    return request.param, request.getfixturevalue({"sd1": "tiny_sd", "sdxl": "tiny_sdxl"}[request.param])


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_file_maps_in_the_hosts_and_changes_the_output(arch_paths, algo, tmp_path):
    arch, paths = arch_paths
    model = load_sd_model(paths["safetensors"], paths["config"])
    base_out, base_ehs = (x.detach() for x in _forward(model))
    # rank 4 with factor 4 on the 32/64-wide tiny layers gives both LoKr layouts: a factorised w2 (64 and
    # wider) and two full matrices (32 wide)
    # (Tucker convs for LoHa only: ComfyUI cannot apply LoKr's, see LycorisSpec)
    spec = LycorisSpec(algo, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, use_tucker=algo == "loha", factor=4)
    params = inject_sd(model.unet, model.text_encoders, arch, spec, conv=True, train_text_encoder=True)
    expected = (len(kohya_unet_targets(model.unet)) + len(kohya_conv_targets(model.unet))
                + sum(len(kohya_text_encoder_targets(e)) for e in model.text_encoders))
    assert {n for n, p in model.unet.named_parameters() if p.requires_grad} == {
        n for n, _ in model.unet.named_parameters() if n.startswith("lycoris.")}
    named = [(f"{i}.{n}", p) for i, m in enumerate([model.unet, *model.text_encoders]) for n, p in m.named_parameters()
             if p.requires_grad]
    assert len(named) == len(params)
    before = {n: p.detach().clone() for n, p in named}

    # trainable: a few AdamW steps move every factor (the zero-initialised half first)
    # eps far below any gradient: a factor whose gradient is tiny but not zero (the zero-initialised half's
    # partner in its first steps) still moves, so the test asks only whether every factor gets a gradient
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, eps=1e-30)
    target = torch.randn_like(base_out, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        out, _ = _forward(model)
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in named if torch.equal(p.detach(), before[n])]
    # SDXL conditions on the penultimate hidden states: CLIP-L's last layer gets no gradient (as in kohya)
    last = model.text_encoders[0].config.num_hidden_layers - 1
    assert all(n.startswith("1.") and f"encoder_layers_{last}_" in n for n in unchanged), unchanged[:3]
    assert len(unchanged) < len(named) // 10

    tensors = model_lycoris_tensors(arch, model.unet, model.text_encoders)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert len(modules) == expected
    parts = {k.split(".", 1)[1] for k in tensors}
    if algo == "loha":
        assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"} == parts
    else:
        assert {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"} <= parts <= {"lokr_w1", "lokr_w2", "lokr_w2_a",
                                                                          "lokr_w2_b", "alpha"}
    if arch == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" in modules  # LDM names, as LoRA
        assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules

    # the file: LyCORIS keys and the header kohya and the hosts read
    meta = lora_metadata(arch=arch, output_name="lyco", rank=4, alpha=2.0, base_model=paths["safetensors"],
                         resolution=64, training={}) | lycoris_metadata(spec)
    path = tmp_path / "lyco.safetensors"
    save_lora_file(path, tensors, meta)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert header["ss_network_module"] == "lycoris.kohya"
    args = json.loads(header["ss_network_args"])
    assert args["algo"] == algo and args["conv_dim"] == "2" and (args.get("use_tucker") == "True") == (algo == "loha")
    assert (args.get("factor") == "4") == (algo == "lokr")

    # every key mapped by both hosts
    checkpoint = read_checkpoint(paths["safetensors"])
    assert hosts.a1111_unmatched(tensors, checkpoint, arch) == []
    up_types = model.unet.config.up_block_types
    key_map = hosts.comfy_key_map(checkpoint, arch, _diffusers_unet_names(model.unet),
                                  lambda i: "CrossAttn" in up_types[i])
    assert modules <= set(key_map)
    assert hosts.comfy_unloaded(tensors, key_map) == []

    # the hosts' weights give the trained model's outputs (its weights rounded to the file's fp16)
    with torch.no_grad():
        for p in params:
            p.copy_(p.half().float())
        trained_out, trained_ehs = _forward(model)
        set_lycoris_weight([model.unet, *model.text_encoders], 0.0)
        off_out, _ = _forward(model)
        set_lycoris_weight([model.unet, *model.text_encoders], 1.0)
    merged_path = tmp_path / "merged.safetensors"
    save_file(hosts.comfy_apply(checkpoint, tensors, key_map), str(merged_path))
    merged = load_sd_model(merged_path, paths["config"])
    with torch.no_grad():
        host_out, host_ehs = _forward(merged)
    assert torch.allclose(host_ehs, trained_ehs, atol=1e-4)
    assert torch.allclose(host_out, trained_out, atol=1e-4), (host_out - trained_out).abs().max()
    change = (host_out - base_out).abs().max().item()
    assert change > 1e-2  # the file changes the output ...
    assert (host_ehs - base_ehs).abs().max().item() > 1e-3  # ... and the text conditioning
    assert torch.allclose(off_out, base_out, atol=1e-5)  # weight 0 is the base model


def test_lycoris_refuses_unknown_types_and_lokr_tucker():
    with pytest.raises(ValueError, match="lora_type: 'glora'"):
        LycorisSpec("glora", rank=4, alpha=4)
    with pytest.raises(ValueError, match="use_tucker: LoKr"):
        LycorisSpec("lokr", rank=4, alpha=4, use_tucker=True)


def test_comfyui_rule_cannot_apply_a_tucker_lokr():
    """Why LoKr Tucker is refused: ComfyUI's kron of the einsum-rebuilt half fails here."""
    g = torch.Generator().manual_seed(0)
    parts = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(2, 16, generator=g),
             "lokr_w2_b": torch.randn(2, 8, generator=g), "lokr_t2": torch.randn(2, 2, 3, 3, generator=g),
             "alpha": torch.tensor(1.0)}
    with pytest.raises(RuntimeError):
        hosts.comfy_delta(parts, (64, 32, 3, 3))


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_full_size_sdxl_lycoris_names_are_the_lora_names(algo):
    """On the real SDXL layout (meta device) LoHa/LoKr land on exactly the 722 + 264 modules LoRA uses,
    under the same kohya names."""
    from importlib import resources

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shared.images.lora import inject_lora
    from shared.sd.kohya_export import model_lora_tensors

    def config(*parts):
        return json.loads((resources.files("shared.sd") / "model_configs" / "sdxl").joinpath(*parts).read_text())

    def build():
        with torch.device("meta"):
            return (UNet2DConditionModel.from_config(config("unet", "config.json")),
                    [CLIPTextModel(CLIPTextConfig(**config("text_encoder", "config.json"))),
                     CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2", "config.json")))])

    unet, encoders = build()
    with torch.device("meta"):
        inject_sd(unet, encoders, "sdxl", LycorisSpec(algo, rank=8, alpha=4, factor=8), train_text_encoder=True)
    lyco = {k.split(".", 1)[0] for k in model_lycoris_tensors("sdxl", unet, encoders)}
    lora_unet, lora_encoders = build()
    with torch.device("meta"):
        inject_lora(lora_unet, kohya_unet_targets(lora_unet), rank=8, alpha=4, dropout=0.0, init="default")
        for encoder in lora_encoders:
            inject_lora(encoder, kohya_text_encoder_targets(encoder), rank=8, alpha=4, dropout=0.0, init="default")
    lora = {k.split(".", 1)[0] for k in model_lora_tensors("sdxl", lora_unet, lora_encoders)}
    assert len(lyco) == 722 + 264 and lyco == lora


# --- trained through `train` ----------------------------------------------------------------------


TRAINED = {  # what each run asks for; every file is then held to both hosts' rules
    "loha": dict(lora_type="loha", conv_rank=2, conv_alpha=1.0, lycoris_use_tucker=True, train_text_encoder=True),
    "lokr": dict(lora_type="lokr", lycoris_factor=4, conv_rank=2, lycoris_decompose_both=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(TRAINED))
def test_the_task_trains_lycoris_files_the_hosts_load(arch_paths, algo, tmp_path):
    from shared.fixtures.images import make_image_folder
    from shared.preflight import load_config
    from shared.train import run_training
    from tests.conftest import write_config

    arch, paths = arch_paths
    images = make_image_folder(tmp_path / "images", count=4)
    config = write_config(tmp_path / "c.yaml", base_model=paths["safetensors"], model_config=paths["config"],
                          train_data_dir=images, output_dir=tmp_path / "out" / "lyco", resolution=64, batch_size=2,
                          max_train_steps=3, save_steps=0, learning_rate=1e-2, seed=0, lora_rank=4, lora_alpha=2.0,
                          sample_prompts=["a red circle"], sample_steps=1, **TRAINED[algo])
    result = run_training(load_config(config))
    with safe_open(str(result.output_path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert header["ss_network_module"] == "lycoris.kohya" and header["ss_network_dim"] == "4"
    args = json.loads(header["ss_network_args"])
    assert args["algo"] == algo and args["conv_dim"] == "2"
    parts = {k.split(".", 1)[1] for k in tensors}
    assert not any("lora_down" in p or "lora_up" in p for p in parts)
    if algo == "loha":
        assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"} == parts
        assert any(k.startswith(("lora_te_", "lora_te1_")) for k in tensors)  # the text encoder trained too
    else:
        # on the tiny widths the small half is a full matrix, the other factorised where it is wide enough
        assert {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"} <= parts <= {"lokr_w1", "lokr_w2", "lokr_w2_a",
                                                                          "lokr_w2_b", "alpha"}
        assert args["factor"] == "4" and args["decompose_both"] == "True"
        assert not any(k.startswith("lora_te") for k in tensors)

    checkpoint = read_checkpoint(paths["safetensors"])
    model = load_sd_model(paths["safetensors"], paths["config"])
    base_out, base_ehs = (x.detach() for x in _forward(model))
    assert hosts.a1111_unmatched(tensors, checkpoint, arch) == []
    up_types = model.unet.config.up_block_types
    key_map = hosts.comfy_key_map(checkpoint, arch, _diffusers_unet_names(model.unet),
                                  lambda i: "CrossAttn" in up_types[i])
    assert {k.split(".", 1)[0] for k in tensors} <= set(key_map)
    assert hosts.comfy_unloaded(tensors, key_map) == []
    merged_path = tmp_path / "merged.safetensors"
    save_file(hosts.comfy_apply(checkpoint, tensors, key_map), str(merged_path))
    with torch.no_grad():
        host_out, host_ehs = _forward(load_sd_model(merged_path, paths["config"]))
    assert (host_out - base_out).abs().max().item() > 1e-3  # the file changes the output
    if algo == "loha":
        assert (host_ehs - base_ehs).abs().max().item() > 1e-4
    assert (tmp_path / "out" / "lyco" / "lyco-grid.png").is_file()  # the grid rendered LoHa/LoKr at 0..1


def test_sampling_at_weight_zero_is_the_base_model(tiny_sd):
    from shared.sd.sampling import lora_weight

    model = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    base_out, _ = _forward(model)
    params = inject_sd(model.unet, model.text_encoders, "sd1", LycorisSpec("loha", rank=4, alpha=4),
                       train_text_encoder=True)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
        with lora_weight(model, 0.0):
            off, _ = _forward(model)
        on, _ = _forward(model)
    assert torch.allclose(off, base_out, atol=1e-5) and (on - base_out).abs().max() > 1e-3
