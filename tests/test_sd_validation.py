"""The SD validation loss: a seeded held-out split or a folder, scored at fixed timesteps and noise, so it
is the same number twice for the same weights, moves when they change, ignores the augmentation, reads
the caches, and leaves the training's random numbers alone (a run with it trains the steps of one
without)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shared.errors import UserError
from shared.fixtures.images import make_image_folder
from shared.images.dataset import scan_dataset
from shared.images.validation_split import split_validation
from shared.preflight import check, load_config
from shared.sd.validation import fixed_timesteps
from shared.train import run_training
from tests.test_llm_training import Recorder
from tests.test_sd_regularisation import loaded_task


@pytest.fixture
def val_dir(tmp_path):
    return make_image_folder(tmp_path / "val", count=3, seed=11)


def test_timesteps_are_kohyas_and_the_split_is_seeded(image_dir):
    assert fixed_timesteps(1000, 4) == [200, 400, 600, 800]
    assert fixed_timesteps(1000, 1) == [500]
    items = scan_dataset(image_dir).items

    def split(seed, fraction=0.34):
        cfg = SimpleNamespace(validation_dir=None, validation_split=fraction, validation_seed=None, seed=seed,
                              caption_extension=".txt", validation_timesteps=4)
        train, held = split_validation(cfg, scan_dataset(image_dir).items, Recorder())
        return [i.path.name for i in train], [i.path.name for i in held]

    train, held = split(0)
    assert len(held) == 2 and len(train) == 4 and not set(train) & set(held)
    assert sorted(train + held) == sorted(i.path.name for i in items)
    assert split(0) == (train, held)  # the same seed, the same split
    assert any(split(seed)[1] != held for seed in range(1, 6))
    assert len(split(0, 0.01)[1]) == 1  # at least one image


def trained_looking(task, seed: int = 0):
    """Give the LoRA up-weights values (they start at zero, where dropout and the LoRA change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in task.model.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return task


def test_the_loss_is_reproducible_moves_with_the_weights_and_ignores_augmentation(sd_config, val_dir):
    task = trained_looking(loaded_task(load_config(sd_config(validation_dir=val_dir, lora_dropout=0.5))))
    first = task.evaluate(1, val_dir).metrics["eval_loss"]
    torch.rand(1000)  # training moves the global generator between two checkpoints
    assert task.evaluate(2, val_dir).metrics["eval_loss"] == first  # dropout 0.5, yet the same number
    lora_b = next(p for n, p in task.model.unet.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        lora_b.add_(0.05)
    moved = task.evaluate(3, val_dir).metrics["eval_loss"]
    assert moved != first
    with torch.no_grad():
        lora_b.sub_(0.05)
    assert task.evaluate(4, val_dir).metrics["eval_loss"] == pytest.approx(first, rel=1e-6)
    assert task.model.unet.training  # back in training mode
    # captions shuffled and dropped, images flipped and cropped at random: none of it reaches validation
    augmented = trained_looking(loaded_task(load_config(sd_config(
        validation_dir=val_dir, lora_dropout=0.5, random_flip=True, random_crop=True, shuffle_caption=True,
        caption_dropout_rate=0.9))))
    assert augmented.evaluate(1, val_dir).metrics["eval_loss"] == pytest.approx(first, rel=1e-6)
    # through the latent and text caches: the same number
    cached = trained_looking(loaded_task(load_config(sd_config(
        validation_dir=val_dir, lora_dropout=0.5, cache_latents="memory", cache_text_encoder_outputs=True))))
    assert cached.evaluate(1, val_dir).metrics["eval_loss"] == pytest.approx(first, rel=1e-5)
    assert len(cached.latent_cache.memory) == 6 + 3  # the training images' and the validation images'


def test_a_run_with_validation_trains_the_same_steps_and_reports_eval_loss(sd_config, val_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = dict(max_train_steps=4, save_steps=2, preview=False)
    plain = run_training(load_config(sd_config(output_dir=tmp_path / "plain" / "x", **common)))
    rec = Recorder()
    checked = run_training(load_config(sd_config(output_dir=tmp_path / "val" / "x", validation_dir=val_dir,
                                                 **common)), rec)
    assert checked.losses == plain.losses  # the training's random numbers are untouched
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(plain.output_path)).values(),
                                                   load_file(str(checked.output_path)).values()))
    checkpoints = [d for kind, d in rec.events if kind == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2] and isinstance(checkpoints[0]["eval_loss"], float)
    logs = EventAccumulator(str(tmp_path / "val" / "x" / "logs"))
    logs.Reload()
    scalars = logs.Scalars("eval/loss")
    assert [s.step for s in scalars] == [2, 4]  # each checkpoint and the end
    assert scalars[0].value == pytest.approx(checkpoints[0]["eval_loss"])
    assert scalars[1].value != scalars[0].value  # four steps of training moved it


def test_a_split_run_trains_without_the_held_out_images(sd_config, tmp_path):
    rec = Recorder()
    result = run_training(load_config(sd_config(validation_split=0.34, max_train_steps=2, preview=False)), rec)
    assert rec.events[0][0] == "memory_plan" and rec.events[1] == ("buckets", {"histogram": {"64x64": 4}})  # 6 images, 2 held out
    from safetensors import safe_open

    with safe_open(str(result.output_path), "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_validation_images"]) == ("4", "2")
    assert meta["ss_validation_split"] == "0.34" and meta["ss_validation_seed"] == "0"


def test_the_preflight_checks_the_validation_settings(sd_config, tmp_path, val_dir):
    base = yaml.safe_load(sd_config().read_text())
    with pytest.raises(UserError, match="validation_split: 0.95 of 6 training images leaves nothing to train"):
        check({**base, "validation_split": 0.95}, source="c.yaml")
    with pytest.raises(UserError, match="validation_split and validation_dir: give one"):
        check({**base, "validation_split": 0.2, "validation_dir": str(val_dir)}, source="c.yaml")
    with pytest.raises(UserError, match="validation_dir is train_data_dir"):
        check({**base, "validation_dir": base["train_data_dir"]}, source="c.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="validation_dir: no images in"):
        check({**base, "validation_dir": str(tmp_path / "empty")}, source="c.yaml")
    with pytest.raises(UserError, match="validation_split must be at least 0 and less than 1"):
        check({**base, "validation_split": 1}, source="c.yaml")
    assert check({**base, "validation_dir": str(val_dir)}, source="c.yaml").items == 6
