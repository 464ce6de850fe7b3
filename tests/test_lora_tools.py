"""LoRA tools (issue 20): resize, merge, extract, convert, info, as library calls and `python -m daemon lora`.

A LoRA (with LoCon convs and text-encoder modules) is trained on the tiny SD1.5 by the real trainer; the
SDXL cases use a random-weight LoRA on the tiny SDXL (its OpenCLIP encoder's fused q/k/v is the case
that matters). Reference outputs come from diffusers' own LoRA loader, not from our code."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.errors import UserError
from shared.preflight import load_config
from shared.sd.base_model import load_sd_model
from shared.sd.lora_file import read_lora
from shared.sd.lora_tools.convert import convert_lora
from shared.sd.lora_tools.extract import extract_lora
from shared.sd.lora_tools.info import info_text, lora_info
from shared.sd.lora_tools.merge import merge_into_checkpoint, merge_loras, parse_weighted
from shared.sd.lora_tools.resize import resize_lora
from shared.train import run_training
from tests.sd_probe import forward, with_diffusers_lora
from tests.test_cli import run_cli

KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _outputs(paths, lora=None, checkpoint=None):
    model = load_sd_model(checkpoint or paths["safetensors"], paths["config"])
    if lora is not None:
        with_diffusers_lora(model, lora)
    with torch.no_grad():
        return forward(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd):
    """A LoCon (rank 8, conv rank 4, alpha 4) with text-encoder modules, 40 steps on the tiny SD1.5."""
    from shared.fixtures.images import make_image_folder
    from tests.conftest import write_config

    root = tmp_path_factory.mktemp("tools")
    images = make_image_folder(root / "images", count=6)
    config = write_config(
        root / "c.yaml", base_model=tiny_sd["safetensors"], model_config=tiny_sd["config"], train_data_dir=images,
        output_dir=root / "out" / "shapes", resolution=64, batch_size=2, max_train_steps=40, save_steps=0,
        learning_rate=2e-3, seed=0, lora_dropout=0.0, lora_rank=8, lora_alpha=4, conv_rank=4, conv_alpha=2,
        train_text_encoder=True,
    )
    return run_training(load_config(config)).output_path


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, tiny_sdxl):
    """A random-weight LoRA (rank 4, alpha 2) on kohya's targets of the tiny SDXL, both text encoders too."""
    from shared.images.lora import inject_lora, kohya_text_encoder_targets, kohya_unet_targets
    from shared.sd.kohya_export import lora_metadata, model_lora_tensors, save_lora_file

    model = load_sd_model(tiny_sdxl["safetensors"], tiny_sdxl["config"])
    torch.manual_seed(0)
    inject_lora(model.unet, kohya_unet_targets(model.unet), rank=4, alpha=2, dropout=0.0, init="default")
    for encoder in model.text_encoders:
        inject_lora(encoder, kohya_text_encoder_targets(encoder), rank=4, alpha=2, dropout=0.0, init="default")
    with torch.no_grad():
        for m in [model.unet, *model.text_encoders]:
            for name, p in m.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("sdxl_lora") / "xl.safetensors"
    meta = lora_metadata(arch="sdxl", output_name="xl", rank=4, alpha=2, base_model=tiny_sdxl["safetensors"],
                         resolution=64, training={})
    save_lora_file(path, model_lora_tensors("sdxl", model.unet, model.text_encoders), meta)
    return path


# --- resize --------------------------------------------------------------------------------------


def test_resize_to_half_rank_keeps_90_percent_energy_and_the_key_grammar(trained):
    result = resize_lora(trained, rank=4)
    assert result.kept_energy >= 0.9, result.summary()
    assert result.path == trained.parent / "shapes-rank4.safetensors"
    source, small = read_lora(trained), read_lora(result.path)
    assert set(small.modules) == set(source.modules)
    assert all(KOHYA_KEY.match(k) for k in small.tensors)
    for key, module in small.modules.items():
        old = source.modules[key]
        assert module.rank == min(4, old.rank) and module.scale == pytest.approx(old.scale)  # alpha follows the rank
        old_delta = old.parts["lora_up.weight"].float().flatten(1) @ old.parts["lora_down.weight"].float().flatten(1)
        new_delta = module.parts["lora_up.weight"].float().flatten(1) @ module.parts["lora_down.weight"].float().flatten(1)
        lost = ((old_delta - new_delta) ** 2).sum() / (old_delta**2).sum()
        assert lost.item() == pytest.approx(1 - result.modules[key][2], abs=2e-3)  # the SVD's kept energy, checked
    assert any(m.kind == "locon" for m in small.modules.values())  # convs resized too
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "shapes-rank4"
    assert float(meta["ss_network_alpha"]) == pytest.approx(2.0)
    assert json.loads(meta["ss_network_args"])["conv_dim"] == 4
    from diffusers import StableDiffusionPipeline

    state, _ = StableDiffusionPipeline.lora_state_dict(load_file(str(result.path)))
    assert len(state) == 2 * len(small.modules)  # diffusers converts every key (it raises on leftovers)


def test_resize_never_overwrites_and_leaves_the_source(trained, tmp_path):
    before = trained.read_bytes()
    first = resize_lora(trained, rank=2, out_dir=tmp_path, name="small")
    second = resize_lora(trained, energy=0.5, out_dir=tmp_path, name="small")
    assert (first.path.name, second.path.name) == ("small.safetensors", "small_2.safetensors")
    assert trained.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_lora(second.path).metadata["ss_network_dim"] == "Dynamic"


# --- merge ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sd1", "sdxl"])
def case(request, trained, sdxl_lora):
    if request.param == "sd1":
        return request.getfixturevalue("tiny_sd"), trained
    return request.getfixturevalue("tiny_sdxl"), sdxl_lora


def test_merge_into_checkpoint_reproduces_base_plus_lora(case, tmp_path):
    paths, lora = case
    result = merge_into_checkpoint(paths["safetensors"], [(lora, 1.0)], out_dir=tmp_path, name="merged")
    assert result.modules == len(read_lora(lora).modules)
    merged_out, merged_ehs = _outputs(paths, checkpoint=result.path)  # loads as a checkpoint, strictly
    lora_out, lora_ehs = _outputs(paths, lora=lora)
    base_out, _ = _outputs(paths)
    assert (lora_out - base_out).abs().max() > 1e-2  # the LoRA does something
    assert torch.allclose(merged_ehs, lora_ehs, atol=1e-3)
    assert torch.allclose(merged_out, lora_out, atol=1e-3), (merged_out - lora_out).abs().max()


def test_extract_recovers_the_lora_effect(case, tmp_path):
    paths, lora = case
    merged = merge_into_checkpoint(paths["safetensors"], [(lora, 1.0)], out_dir=tmp_path, name="tuned").path
    source = read_lora(lora)
    rank = max(m.rank for m in source.modules.values())
    conv = max((m.rank for m in source.modules.values() if m.kind == "locon"), default=0)
    result = extract_lora(paths["safetensors"], merged, rank=rank, conv_rank=conv, out_dir=tmp_path, name="extracted",
                          model_config=paths["config"])
    extracted = read_lora(result.path)
    assert set(extracted.modules) <= set(source.modules)
    assert len(extracted.modules) == result.modules and result.modules + result.skipped >= len(source.modules)
    for key in set(source.modules) - set(extracted.modules):  # left out only where the LoRA changes ~nothing
        m = source.modules[key]
        assert (m.parts["lora_up.weight"].float().flatten(1) @ m.parts["lora_down.weight"].float().flatten(1)
                * m.scale).abs().max() < 1e-5
    assert all(KOHYA_KEY.match(k) for k in extracted.tensors)
    base_out, base_ehs = _outputs(paths)
    lora_out, lora_ehs = _outputs(paths, lora=lora)
    ex_out, ex_ehs = _outputs(paths, lora=result.path)
    effect = (lora_out - base_out).norm()
    assert (ex_out - lora_out).norm() / effect < 0.05
    assert (ex_ehs - lora_ehs).norm() / (lora_ehs - base_ehs).norm() < 0.05


def test_merge_loras_concat_is_exact_and_svd_reports_energy(trained, tmp_path):
    half = resize_lora(trained, rank=4, out_dir=tmp_path, name="half").path
    inputs = parse_weighted([f"{trained}:0.5", f"{half}:-0.25"])
    assert inputs == [(trained, 0.5), (half, -0.25)]
    concat = merge_loras(inputs, mode="concat", out_dir=tmp_path, name="both")
    a, b, c = read_lora(trained), read_lora(half), read_lora(concat.path)
    key = next(k for k, m in a.modules.items() if m.kind == "lora")

    def delta(m):
        return (m.parts["lora_up.weight"].float().flatten(1) @ m.parts["lora_down.weight"].float().flatten(1)) * m.scale

    expected = 0.5 * delta(a.modules[key]) - 0.25 * delta(b.modules[key])
    assert c.modules[key].rank == a.modules[key].rank + b.modules[key].rank
    assert torch.allclose(delta(c.modules[key]), expected, atol=2e-3)
    svd = merge_loras(inputs, mode="svd", rank=4, out_dir=tmp_path, name="both_svd")
    assert 0.5 < svd.kept_energy <= 1.0
    assert read_lora(svd.path).modules[key].rank == 4


# --- convert ------------------------------------------------------------------------------------


def test_convert_round_trip_and_diffusers_loads_the_same_lora(case, tmp_path):
    paths, lora = case
    to_diffusers = convert_lora(lora, to="diffusers", out_dir=tmp_path, name="peft")
    with safe_open(str(to_diffusers.path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(".lora_A." in k for k in keys) and "lora_adapter_metadata" in meta
    # diffusers scales the converted file as the hosts scale the kohya one
    kohya_out, kohya_ehs = _outputs(paths, lora=lora)
    peft_out, peft_ehs = _outputs(paths, lora=to_diffusers.path)
    assert torch.allclose(peft_out, kohya_out, atol=1e-4) and torch.allclose(peft_ehs, kohya_ehs, atol=1e-4)
    back = convert_lora(to_diffusers.path, to="kohya", out_dir=tmp_path, name="kohya_again")
    original, again = load_file(str(lora)), load_file(str(back.path))
    assert set(again) == set(original)  # lora_te_/lora_te1_, text_model_, LDM names for SDXL, every key
    for key, tensor in original.items():
        assert torch.equal(again[key].float(), tensor.float()), key  # .alpha is lora_alpha, not the rank


# --- info and the command line ---------------------------------------------------------------------


def test_info_reports_type_rank_alpha_targets_base(trained):
    info = lora_info(trained)
    assert info["type"] == "LoCon" and info["rank"] == 8 and info["alpha"] == 4.0
    assert set(info["ranks"]) == {"4", "8"}  # LoCon convs at rank 4
    assert info["targets"]["unet"] > 0 and info["targets"]["text encoder"] == 12
    assert info["base"]["family"] == "sd1" and info["base"]["ss_sd_model_name"] == "tiny-sd15.safetensors"
    assert info["network_module"] == "networks.lora" and info["network_args"]["conv_dim"] == 4
    text = info_text(info)
    assert "type: LoCon" in text and "alias: <lora:shapes:1>" in text and "ss_tag_frequency" in text


def test_cli_lora_tools(trained, tmp_path):
    out = run_cli("lora", "info", str(trained), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rank"] == 8
    out = run_cli("lora", "resize", str(trained), "--rank", "4", "--out", str(tmp_path), "--name", "cli")
    assert out.returncode == 0, out.stderr
    assert "kept" in out.stdout and (tmp_path / "cli.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["info", "{tmp}/missing.safetensors"], "missing.safetensors: no such file"),
        (["resize", "{base}", "--rank", "2"], "tiny-sd15.safetensors: a model checkpoint, not a LoRA"),
        (["resize", "{tmp}/junk.safetensors", "--rank", "2"], "junk.safetensors: not a readable LoRA file"),
        (["merge", "{lora}", "--base", "{tmp}/junk.safetensors"], "junk.safetensors: not a readable checkpoint"),
        (["merge", "{lora}"], "merge: name at least two LoRA files"),
        (["resize", "{lora}", "--rank", "2", "--name", "../up"], "output_name '../up' must be"),
    ],
)
def test_cli_bad_input_is_one_line(trained, tiny_sd, tmp_path, args, expected):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    args = [a.format(tmp=tmp_path, base=tiny_sd["safetensors"], lora=trained) for a in args]
    out = run_cli("lora", *args)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and expected in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_resize_needs_a_target(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "one.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2)},
              str(path))
    with pytest.raises(UserError, match="give exactly one of --rank or --energy"):
        resize_lora(path)
