"""The Flux task end to end on the tiny FLUX.1 (issue 19): every layout trains through `train`, the file
holds exactly the kohya Flux modules of the chosen targets, diffusers loads it with zero unmatched keys
and it lowers the loss of a fixed batch; the memory levers (fp8 storage, block swap) run through the
task, block swap to the same losses; previews, grid and sidecars; resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shared.flux import task as flux_task
from shared.flux.export import expected_modules, file_modules
from shared.flux.lora import clip_l_targets, select_targets
from shared.preflight import load_config
from shared.train import run_training
from tests.conftest import write_config
from tests.test_llm_training import Recorder

# The four layouts users have: the BFL transformer with its separate files (bf16 and fp8), ComfyUI's
# all-in-one checkpoint, a diffusers folder. The tiny model's T5 tokenizer lies beside its files (as
# ComfyUI's lies in its install) and is found there.
LAYOUTS = {
    "bfl": lambda p: dict(base_model=p["transformer"], flux_ae=p["ae"], flux_clip_l=p["clip_l"], flux_t5xxl=p["t5xxl"],
                          model_config=p["model_config"]),
    "fp8": lambda p: dict(base_model=p["transformer_fp8"], flux_ae=p["ae"], flux_clip_l=p["clip_l"],
                          flux_t5xxl=p["t5xxl_fp8"], model_config=p["model_config"]),  # fp8_base auto: on
    "comfy": lambda p: dict(base_model=p["comfy"], model_config=p["model_config"]),
    "diffusers": lambda p: dict(base_model=p["diffusers"]),
}
QUICK = dict(resolution=64, batch_size=2, max_train_steps=2, save_steps=0, learning_rate=1e-3, seed=0,
             t5_max_length=16, preview=False)


@pytest.fixture(scope="module")
def flux_images(tmp_path_factory):
    from shared.fixtures.images import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("flux_images") / "images", count=4)


def flux_config(tiny, folder: Path, layout: str = "bfl", images: Path | None = None, **overrides) -> Path:
    values = {**LAYOUTS[layout](tiny), "train_data_dir": images, "output_dir": folder / "out" / "flux_lora",
              "cache_dir": folder / "cache", **QUICK, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "config.yaml", **{k: v for k, v in values.items() if v is not None})


def lora_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_trains_through_train_into_the_kohya_flux_module_set(tiny_flux, flux_images, tmp_path, layout):
    cfg = load_config(flux_config(tiny_flux, tmp_path, layout, flux_images))
    assert cfg.task == "flux" and cfg.t5_tokenizer is not None  # the pre-flight found the tokenizer and kept it
    rec = Recorder()
    result = run_training(cfg, rec)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors, meta = lora_file(result.output_path)
    from shared.fixtures.tiny_flux import tiny_configs

    targets = select_targets(tiny_configs("dev")["transformer"])  # the defaults: attention + MLP of every block
    assert file_modules(tensors) == expected_modules(targets)
    assert set(tensors) == {f"{m}.{s}" for m in expected_modules(targets) for s in ("lora_down.weight", "lora_up.weight",
                                                                                    "alpha")}
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_output_name"] == "flux_lora"
    assert meta["ss_fp8_base"] == str(layout == "fp8") and meta["ss_timestep_sampling"] == "shift"
    sidecar = json.loads(result.output_path.with_suffix(".json").read_text())
    assert sidecar["sd version"] == "Flux"
    assert any("fp8 (float8_e4m3fn) blocks" in line for line in rec.lines) == (layout == "fp8")
    assert any(line.startswith("Text cache (disk)") and "T5 and CLIP-L freed" in line for line in rec.lines)


def fixed_batch_loss(transformer, text, latents, draws: int = 4) -> float:
    """The flow-matching loss of the latents at `draws` fixed noises and noise levels."""
    from shared.flux import conditioning as C
    from shared.flux import flow_matching as FM

    gens = [torch.Generator().manual_seed(100 + i) for i in range(draws)]
    batch = C.FluxText(text.prompt_embeds.expand(draws, -1, -1), text.pooled.expand(draws, -1), text.text_ids)
    with torch.no_grad():
        return FM.flow_matching_loss(transformer, latents.expand(draws, -1, -1, -1), batch, gens,
                                     timestep_sampling="shift").item()  # as it trained


@pytest.fixture(scope="module")
def trained_double_blocks(tiny_flux, tmp_path_factory):
    """One image trained hard, LoRA on the double blocks and CLIP-L (diffusers 0.42 reads single-block
    linear1 only at the published width; test_flux_lora covers that)."""
    from shared.fixtures.images import make_image_folder

    root = tmp_path_factory.mktemp("flux_fixed")
    images = make_image_folder(root / "one", count=1)
    cfg = load_config(flux_config(tiny_flux, root, "bfl", images, batch_size=1, max_train_steps=50,
                                  learning_rate=2e-2, lora_dropout=0.0, flux_single_blocks="none",
                                  train_text_encoder=True, cache_latents="memory", sample_prompts=["a photo of sks"],
                                  sample_steps=2, preview=True))
    rec = Recorder()
    return cfg, run_training(cfg, rec), rec, images


def _diffusers_pipeline(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from shared.flux.base_model import load_flux_model

    base = load_flux_model(tiny["transformer"], ae=tiny["ae"], clip_l=tiny["clip_l"], t5xxl=tiny["t5xxl"],
                           model_config=tiny["model_config"], dtype=torch.float32)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=base.vae, text_encoder=base.text_encoder,
                        tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                        transformer=base.transformer)
    return base, pipe


def test_the_lora_loads_in_diffusers_with_zero_unmatched_keys_and_lowers_the_fixed_batch_loss(
        trained_double_blocks, tiny_flux, caplog):
    from shared.flux import conditioning as C
    from shared.images.dataset import load_pixels
    from shared.images.train_data import plan_data
    from shared.reporting import Reporter

    cfg, result, _, _ = trained_double_blocks
    tensors, _ = lora_file(result.output_path)
    base, pipe = _diffusers_pipeline(tiny_flux)
    targets = select_targets(base.transformer.config, single_blocks="none")
    assert file_modules(tensors) == expected_modules(targets, clip_l_targets(base.text_encoder))
    # the training image's latents and caption: the fixed batch
    data = plan_data(cfg, base.resolution_multiple, Reporter())
    s = data.sample(0, 0, 0, 0)
    pixels = load_pixels(data.items[0].path, data.plan.buckets[0], s.resized, s.crop, False)[None]
    latents = C.sample_latents(base.vae.config, C.latent_params(base.vae, pixels), [torch.Generator().manual_seed(1)])
    caption = data.fixed_caption(0)
    with torch.no_grad():
        base_text = C.encode_text(base, [caption], max_sequence_length=cfg.t5_max_length)
    before = fixed_batch_loss(pipe.transformer, base_text, latents)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(result.output_path))
    signs = ("unexpected keys", "unsupported keys", "missing keys", "incompatible keys", "not loaded")
    assert [r.getMessage() for r in caplog.records if any(x in r.getMessage().lower() for x in signs)] == []
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert lora_layers == {p for t in targets for p in t.parts}
    with torch.no_grad():
        text = C.encode_text(base, [caption], max_sequence_length=cfg.t5_max_length)
    assert not torch.allclose(text.pooled, base_text.pooled)  # the CLIP-L LoRA changes the conditioning
    after = fixed_batch_loss(pipe.transformer, text, latents)
    assert after < 0.85 * before, (before, after)  # measured: 1.45 -> 1.10


def test_samples_grid_preview_and_the_render_hook(trained_double_blocks):
    cfg, result, rec, _ = trained_double_blocks
    out = Path(cfg.output_dir)
    assert (out / "flux_lora-grid.png").is_file() and result.output_path.with_suffix(".preview.png").is_file()
    from PIL import Image

    with Image.open(out / "flux_lora-grid.png") as grid:
        assert grid.size == (4 * 64, 14 + 64)  # base, 0.5, 0.8, 1.0 for the one prompt
    assert any("T5 freed" in line and "CLIP-L" not in line for line in rec.lines)  # CLIP-L trains: it stays
    # the latents were cached, so the VAE's encoder left before training; the grid and preview only decode
    assert any(line.startswith("Freed the VAE encoder") for line in rec.lines)


def test_the_render_hook_takes_prompts_seeds_and_a_weight(tiny_flux, flux_images, tmp_path):
    import numpy as np

    from shared.flux.task import FluxTask
    from shared.training.precision import setup_precision

    cfg = load_config(flux_config(tiny_flux, tmp_path, "comfy", flux_images, sample_prompts=["a red car"],
                                  sample_steps=2))
    task = FluxTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    with torch.no_grad():
        for name, p in task.model.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    base, full = task.pictures(["a red car"], weight=0.0), task.pictures(["a red car"])
    again = task.pictures(["a red car"], seeds=[cfg.seed])
    other = task.pictures(["a red car"], seeds=[cfg.seed + 5])
    assert base[0].size == (64, 64)
    assert np.abs(np.asarray(full[0], float) - np.asarray(base[0], float)).max() > 0
    assert np.array_equal(np.asarray(full[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(full[0]), np.asarray(other[0]))
    with pytest.raises(KeyError, match="was not cached"):  # the encoders were freed after caching
        task.pictures(["a prompt nobody cached"])


def test_fp8_storage_and_block_swap_through_the_task(tiny_flux, flux_images, tmp_path, monkeypatch):
    from shared.flux.fp8 import FP8
    from shared.flux.task import FluxTask
    from shared.training.precision import setup_precision

    monkeypatch.setitem(flux_task.OFFLOAD_DTYPE, "cpu", torch.float64)
    cfg = load_config(flux_config(tiny_flux, tmp_path, "bfl", flux_images, fp8_base="true", blocks_to_swap="3"))
    task = FluxTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    transformer = task.model.transformer
    assert transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == FP8
    assert [b is s for b, s in zip(task.swap.blocks, [transformer.transformer_blocks[1],
                                                       *transformer.single_transformer_blocks])] == [True] * 3
    frozen = [p for p in task.swap.blocks[0].parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float64 for p in frozen)  # waiting in the offload place
    transformer.to(torch.float32)  # a whole-model move (accelerate's prepare does one) leaves them there
    assert all(p.dtype == torch.float64 for p in frozen)
    assert all(p.dtype == torch.float32 for p in task.swap.blocks[0].parameters() if p.requires_grad)


@pytest.mark.parametrize("fp8", [False, True])
def test_block_swap_gives_the_same_losses_as_no_swap_through_train(tiny_flux, flux_images, tmp_path, monkeypatch,
                                                                   fp8):
    # on this CPU the offload place is float64: a swapped block used while out would fail on the dtype
    monkeypatch.setitem(flux_task.OFFLOAD_DTYPE, "cpu", torch.float64)
    layout = "fp8" if fp8 else "bfl"
    runs = {}
    for swap in ("0", "3"):
        cfg = load_config(flux_config(tiny_flux, tmp_path / swap, layout, flux_images, blocks_to_swap=swap,
                                      max_train_steps=3, learning_rate=5e-3))
        rec = Recorder()
        runs[swap] = (run_training(cfg, rec), rec)
    (plain, _), (swapped, rec) = runs["0"], runs["3"]
    assert any("3 blocks swapped" in line for line in rec.lines)
    assert max(abs(a - b) for a, b in zip(plain.losses, swapped.losses)) < 1e-4, (plain.losses, swapped.losses)
    a, _ = lora_file(plain.output_path)
    b, _ = lora_file(swapped.output_path)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3


def test_schnell_trains_with_its_own_defaults(tiny_flux_schnell, flux_images, tmp_path):
    cfg = load_config(flux_config(tiny_flux_schnell, tmp_path, "comfy", flux_images, sample_prompts=["a red car"],
                                  t5_max_length=None))
    rec = Recorder()
    result = run_training(cfg, rec)
    _, meta = lora_file(result.output_path)
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert meta["ss_t5xxl_max_token_length"] == "256"  # schnell's T5 length
    assert (Path(cfg.output_dir) / "flux_lora-grid.png").is_file()
