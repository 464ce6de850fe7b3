"""Regularisation (prior-preservation) images, as kohya's reg_data_dir / prior_loss_weight: the folder is
read like the training data (class captions from `N_name`), balanced against the training images (the
epoch doubles), and each regularisation sample's loss and gradient count with prior_loss_weight."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from shared.errors import UserError
from shared.fixtures.images import make_image_folder
from shared.images.regularisation import balance_repeats, scan_reg
from shared.preflight import check, load_config
from shared.train import run_training
from tests.test_llm_training import Recorder


def loaded_task(cfg):
    """An SD task set up as the loop sets it up (model, data, LoRA), without training."""
    from accelerate.utils import set_seed

    from shared.sd.task import SDTask
    from shared.training.precision import setup_precision

    _, precision = setup_precision(cfg)
    set_seed(cfg.seed)
    task = SDTask(cfg, Recorder())
    task.load(precision)
    task.build_caches()
    return task


@pytest.fixture
def reg_dir(tmp_path):
    """kohya's layout: `reg/1_shape/` with uncaptioned class images."""
    make_image_folder(tmp_path / "reg" / "1_shape", count=4, captions="none", seed=7)
    return tmp_path / "reg"


def test_balancing_matches_the_training_images_per_epoch():
    assert balance_repeats([1, 1, 1, 1], 30) == [8, 8, 7, 7]  # fewer: one more each, in turn
    assert balance_repeats([1] * 40, 30) == [1] * 30 + [0] * 10  # more: the rest are left out
    assert balance_repeats([5, 5, 5], 7) == [5, 5, 0]  # each with its own repeats first
    assert balance_repeats([2, 3], 5) == [2, 3]
    assert balance_repeats([], 10) == []


def test_the_folder_is_read_like_training_data_with_class_captions(reg_dir):
    other = reg_dir / "2_red circle"
    make_image_folder(other, count=2, captions="txt", seed=3)  # its own captions win over the class name
    scan = scan_reg({"reg_data_dir": reg_dir, "caption_extension": ".txt"})
    by_folder = {}
    for item in scan.items:
        by_folder.setdefault((item.subset, item.repeats), set()).add(item.caption)
    assert by_folder[("1_shape", 1)] == {"shape"}
    assert len(by_folder[("2_red circle", 2)]) == 2 and all(c.endswith("flat shapes style")
                                                            for c in by_folder[("2_red circle", 2)])


def test_regularisation_images_double_the_epoch_and_count_with_prior_loss_weight(sd_config, reg_dir, tmp_path):
    """A batch of training (T) and regularisation (R) images: its summed loss is L(T) + w * L(R), and so is
    its gradient; with w = 0 it is exactly the training images' (the regularisation images add nothing)."""
    # fp32: in bf16 a batch of four rounds differently from two batches of two, and this test checks the
    # weighting's arithmetic to 1e-4
    cfg = load_config(sd_config(reg_data_dir=reg_dir, prior_loss_weight=0.3, lora_dropout=0.0, trigger_word="sks",
                                mixed_precision="no"))
    task = loaded_task(cfg)
    plain = loaded_task(load_config(sd_config(lora_dropout=0.0)))
    assert len(task.data.training_items) == 6 and sum(i.is_reg for i in task.data.items) == 4
    assert len(task.epoch_batches(0, 2)) == 2 * len(plain.epoch_batches(0, 2)) == 6  # 6 training + 6 reg per epoch
    samples = [s for batch in task.epoch_batches(0, 2) for s in batch]
    train = [s for s in samples if not task.data.items[s.index].is_reg][:2]
    reg = [s for s in samples if task.data.items[s.index].is_reg][:2]
    assert {s.caption for s in reg} == {"shape"}  # the class name of 1_shape, without the trigger word
    assert all(s.caption.startswith("sks, ") for s in train)
    params = [p for group in task.param_groups() for p in group["params"]]
    modules = task.train_modules()

    def loss_and_grad(items, weight):
        task.data.cfg = dataclasses.replace(cfg, prior_loss_weight=weight)
        summed, count = task.loss(items, modules)
        grads = torch.autograd.grad(summed, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        return summed.item(), flat, count

    l_train, g_train, _ = loss_and_grad(train, 0.3)
    l_reg, g_reg, _ = loss_and_grad(reg, 1.0)  # the regularisation images' own (unweighted) loss
    assert l_reg > 0 and g_reg.abs().sum() > 0
    for w in (0.0, 0.3, 1.0):
        l_mixed, g_mixed, count = loss_and_grad(train + reg, w)
        assert count == 4  # the batch mean is over every sample, regularisation ones too (as kohya's)
        assert l_mixed == pytest.approx(l_train + w * l_reg, rel=1e-5)
        scale = g_train.abs().max()
        assert torch.allclose(g_mixed, g_train + w * g_reg, rtol=1e-4, atol=1e-5 * scale)
    # the regularisation share is not negligible here, so a weight that were ignored would show
    assert not torch.allclose(g_train + g_reg, g_train, rtol=1e-2, atol=1e-3 * scale)


def test_a_run_with_regularisation_images_records_them_as_kohya_does(sd_config, reg_dir):
    rec = Recorder()
    result = run_training(load_config(sd_config(reg_data_dir=reg_dir, prior_loss_weight=0.5, max_train_steps=2,
                                                preview=False)), rec)
    assert rec.events[0][0] == "memory_plan" and rec.events[1] == ("buckets", {"histogram": {"64x64": 12}})  # 6 training + 6 regularisation per epoch
    with safe_open(str(result.output_path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "4"
    assert meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 4}}
    assert "1_shape" not in json.loads(meta["ss_dataset_dirs"])  # the user's own images only
    assert any("Regularisation images: Found 4 images" in line for line in rec.lines)


def test_the_preflight_reads_the_regularisation_folder_and_confines_both_folders(sd_config, tmp_path, tiny_sd, image_dir):
    from shared.preflight import PathNotAllowed
    from shared.roots import Roots

    base = yaml.safe_load(sd_config().read_text())
    with pytest.raises(UserError, match=r"reg_data_dir: .*missing does not exist"):
        check({**base, "reg_data_dir": str(tmp_path / "missing")}, source="c.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="reg_data_dir: no images in"):
        check({**base, "reg_data_dir": str(tmp_path / "empty")}, source="c.yaml")
    with pytest.raises(UserError, match="reg_data_dir is train_data_dir"):
        check({**base, "reg_data_dir": base["train_data_dir"]}, source="c.yaml")
    outside = make_image_folder(tmp_path / "outside" / "1_dog", count=1, captions="none").parent
    roots = Roots(read=[image_dir, tiny_sd["safetensors"].parent, tiny_sd["config"]], write=[tmp_path / "out"])
    for key in ("reg_data_dir", "validation_dir"):  # confined as read paths before they are looked at
        with pytest.raises(PathNotAllowed) as err:
            check({**base, key: str(outside)}, source="c.yaml", roots=roots)
        assert err.value.key == key and "outside the folders this daemon may read" in str(err.value)
