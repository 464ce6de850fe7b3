"""Optimizers and schedules (issue 20): each optimizer trains the tiny SD1.5 model through the loop (the
loss on its own images at fixed noise and timesteps falls) or is refused in one line; the learning rate's
range follows the optimizer; Prodigy reports its adapted rate (d x lr) in the events and TensorBoard;
schedule-free AdamW writes its average; the schedules have the shapes their names promise."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import ConfigError
from shared.images.dataset import load_pixels, scan_dataset, tokenize
from shared.preflight import load_config
from shared.schema.optimizer import OPTIMIZER_ARGS
from shared.sd.base_model import load_sd_model
from shared.sd.conditioning import encode_text
from shared.train import run_training
from shared.training import optim
from shared.training import state as states
from tests.sd_probe import with_diffusers_lora
from tests.test_llm_training import Recorder


def fixed_loss(paths, image_dir, lora_path=None, draws: int = 3) -> float:
    """The noise loss of the training images (their captions) at fixed noise and timesteps."""
    model = load_sd_model(paths["safetensors"], paths["config"])
    if lora_path is not None:
        with_diffusers_lora(model, lora_path)
    items = scan_dataset(image_dir, None, ".txt").items
    pixels = torch.stack([load_pixels(i.path, (64, 64), (64, 64), (0, 0), False) for i in items])
    g = torch.Generator().manual_seed(7)
    losses = []
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        ehs, _ = encode_text(model, tokenize(model.tokenizers, [i.caption for i in items]))
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(50, 950, (len(items),), generator=g)
            noisy = model.noise_scheduler.add_noise(latents, noise, t)
            losses.append(torch.nn.functional.mse_loss(model.unet(noisy, t, ehs).sample, noise).item())
    return sum(losses) / len(losses)


def test_the_declared_argument_names_are_the_constructors():
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree
    from transformers.optimization import Adafactor

    classes = {"adamw": torch.optim.AdamW, "prodigy": Prodigy, "adafactor": Adafactor, "lion": Lion,
               "adamw_schedulefree": AdamWScheduleFree}
    assert set(OPTIMIZER_ARGS) == set(optim.OPTIMIZERS) == {*classes, "adamw8bit"}
    for name, cls in classes.items():
        accepted = set(inspect.signature(cls.__init__).parameters)
        assert set(OPTIMIZER_ARGS[name]) <= accepted, name
        assert {"lr", "weight_decay"} <= accepted  # the keys of their own, passed by the builders


# name -> (learning_rate, extra config): each trains 20 steps of the tiny model
TRAINED = {
    "adamw": (2e-3, {}),
    "prodigy": (1.0, {"optimizer_args": {"d_coef": 2.0}}),
    "adafactor": (2e-3, {}),
    "adafactor-relative": (2e-3, {"optimizer_args": {"relative_step": True}}),
    "lion": (3e-4, {}),
    "adamw_schedulefree": (2e-3, {"lr_warmup_steps": 3}),
}


@pytest.fixture(scope="module")
def base_loss(tiny_sd, tmp_path_factory):
    from shared.fixtures.images import make_image_folder

    images = make_image_folder(tmp_path_factory.mktemp("opt_images") / "images", count=6)
    return images, fixed_loss(tiny_sd, images)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINED))
def test_each_optimizer_trains_the_tiny_model(name, tiny_sd, base_loss, sd_config, tmp_path):
    images, before = base_loss
    lr, extra = TRAINED[name]
    rec = Recorder()
    cfg = load_config(sd_config(optimizer=name.split("-")[0], learning_rate=lr, train_data_dir=images,
                                max_train_steps=20, save_steps=10, lora_dropout=0.0, preview=False, **extra))
    result = run_training(cfg, rec)
    assert result.steps == 20 and all(math.isfinite(x) for x in result.losses)
    after = fixed_loss(tiny_sd, images, result.output_path)
    assert after < before * 0.99, (name, before, after)
    lrs = [d["lr"] for k, d in rec.events if k == "progress"]
    assert len(lrs) == 20 and all(math.isfinite(x) and x >= 0 for x in lrs)
    if name == "prodigy":
        # the reported rate is Prodigy's adapted d x lr: the state at step 10 holds both factors
        for step in (10,):
            group = states.load_state(tmp_path / "out" / "my_lora" / "checkpoints" / states.state_name(step))[
                "optimizer"]["param_groups"][0]
            assert lrs[step - 1] == pytest.approx(group["d"] * group["lr"], rel=1e-6)
        assert max(lrs) > 100 * 1e-6  # d grew from d0 = 1e-6
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logs = EventAccumulator(str(tmp_path / "out" / "my_lora" / "logs"))
        logs.Reload()
        assert [e.value for e in logs.Scalars("lr")] == pytest.approx(lrs, rel=1e-6)
    if name == "adafactor-relative":
        assert any("relative_step: its own time-dependent rate" in line for line in rec.lines)
        assert lrs == pytest.approx([1e-2] * 20)  # its own rate, min(1e-2, 1 / sqrt(step)), not learning_rate
    if name == "adamw_schedulefree":
        assert lrs[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr]) and lrs[-1] == pytest.approx(lr)  # no decay


def test_schedule_free_writes_its_average(sd_config, tmp_path):
    """The published file holds the average x, not the point y the optimizer steps at: from the state a
    stop wrote (y and z), x = y + (1 - 1/beta1)(z - y), written the way the task writes its file."""
    from shared.sd.task import SDTask
    from shared.training.precision import setup_precision

    cfg = load_config(sd_config(optimizer="adamw_schedulefree", learning_rate=2e-3, max_train_steps=8,
                                lora_dropout=0.0, preview=False))
    result = run_training(cfg, Recorder(stop_at=3))
    assert result.stopped_early and result.steps == 3
    state = states.load_state(tmp_path / "out" / "my_lora" / "checkpoints" / states.state_name(3))
    group = state["optimizer"]["param_groups"][0]
    assert group["train_mode"] is True  # saved at the training point, so a resume continues from it

    task = SDTask(cfg, Recorder())  # the same model and adapters: its trainable() order is the optimizer's
    task.load(setup_precision(cfg)[1])
    trained = task.trainable()
    beta1 = group["betas"][0]
    with torch.no_grad():
        for index, name in enumerate(trained):
            y, z = state["lora"][name], state["optimizer"]["state"][index]["z"]
            trained[name].copy_(y + (1 - 1 / beta1) * (z - y))
    expected = task.tensors()
    published = load_file(str(result.output_path))
    assert published.keys() == expected.keys()
    assert all(torch.equal(published[k], expected[k]) for k in published)
    with torch.no_grad():  # and not y's
        for name, tensor in trained.items():
            tensor.copy_(state["lora"][name])
    at_y = task.tensors()
    assert any(not torch.equal(published[k], at_y[k]) for k in published)


def test_refused_in_one_line(sd_config, monkeypatch):
    with pytest.raises(ConfigError, match=r"^.*optimizer: adamw8bit needs a CUDA GPU \(bitsandbytes\); use `adamw`"):
        run_training(load_config(sd_config(optimizer="adamw8bit", device="cpu")))
    # a missing package: the install line, before the model loads
    import importlib

    real = importlib.import_module

    def no_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_prodigy)
    with pytest.raises(ConfigError) as err:
        run_training(load_config(sd_config(optimizer="prodigy", learning_rate=1.0)))
    assert str(err.value) == ("optimizer: prodigy needs the prodigyopt package (pip install prodigyopt), or choose "
                              "another optimizer")
    monkeypatch.undo()
    # arguments: a misspelt name at the pre-flight, a value the optimizer refuses before the model loads
    with pytest.raises(ConfigError, match=r"optimizer_args: prodigy takes no argument 'dcoef' \(did you mean 'd_coef'"):
        load_config(sd_config(optimizer="prodigy", learning_rate=1.0, optimizer_args={"dcoef": 2}))
    with pytest.raises(ConfigError, match="optimizer_args: lr has its own key; set learning_rate instead"):
        load_config(sd_config(optimizer_args={"lr": 0.1}))
    with pytest.raises(ConfigError, match=r"^optimizer_args: prodigy refused \{'d0': -1.0\} \(Invalid d0 value: -1.0\)$"):
        run_training(load_config(sd_config(optimizer="prodigy", learning_rate=1.0, optimizer_args={"d0": -1.0})))


@pytest.mark.parametrize(("values", "message"), [
    (dict(optimizer="prodigy"), "learning_rate: with optimizer prodigy it is a multiplier of Prodigy's own step-size "
                                "estimate and must be between 0.1 and 10 (1.0 is usual), got 0.001"),
    (dict(optimizer="prodigy", learning_rate=1.0, train_text_encoder=True, text_encoder_lr=5e-5),
     "text_encoder_lr: with optimizer prodigy it is a multiplier"),
    (dict(optimizer="lion", learning_rate=1.0), "learning_rate must be less than 1 for optimizer lion, got 1"),
    (dict(lr_warmup_steps=2, lr_warmup_ratio=0.1), "lr_warmup_steps and lr_warmup_ratio both set the warm-up"),
    (dict(lr_scheduler_num_cycles=3), "lr_scheduler_num_cycles applies to lr_scheduler: cosine_with_restarts, not "
                                      "cosine"),
    (dict(lr_scheduler_power=2.0, lr_scheduler="linear"), "lr_scheduler_power applies to lr_scheduler: polynomial"),
])
def test_the_learning_rate_range_follows_the_optimizer(sd_config, values, message):
    with pytest.raises(ConfigError, match="^.*config.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(sd_config(**values))


def test_prodigy_takes_its_multiplier_and_relative_adafactor_no_rate(sd_config):
    assert load_config(sd_config(optimizer="prodigy", learning_rate=1.0)).learning_rate == 1.0
    cfg = load_config(sd_config(optimizer="adafactor", learning_rate=5.0, optimizer_args={"relative_step": True}))
    assert optim.relative_adafactor(cfg)


def _rates(cfg, total=20):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer(cfg, [{"params": [param], "lr": cfg.learning_rate}], total)
    schedule = optim.build_schedule(cfg, optimizer, total)
    rates = []
    for _ in range(total):
        param.grad = torch.ones(1)
        optimizer.step()
        schedule.step()
        rates.append(optim.current_lr(cfg, optimizer, schedule))
    return rates


def test_the_schedules_have_their_shapes(sd_config):
    def cfg(**values):
        return load_config(sd_config(learning_rate=1e-3, **values))

    restarts = _rates(cfg(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=4))
    # warm-up to the peak at step 4, then two cosine cycles of 8 steps, each starting at the peak again
    assert restarts[3] == pytest.approx(1e-3) and restarts[11] == pytest.approx(1e-3) and restarts[10] < 1e-4
    poly = _rates(cfg(lr_scheduler="polynomial", lr_scheduler_power=2.0))
    lr_end = 1e-7
    assert poly[9] == pytest.approx((1e-3 - lr_end) * (1 - 10 / 20) ** 2 + lr_end)
    ratio = _rates(cfg(lr_scheduler="linear", lr_warmup_ratio=0.25))  # 5 of 20 steps
    assert ratio[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3]) and ratio[5] < 1e-3
    constant = _rates(cfg(lr_scheduler="constant", lr_warmup_steps=2))
    assert constant[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and constant[-1] == pytest.approx(1e-3)
    cosine = _rates(cfg(lr_scheduler="cosine"))
    assert cosine[9] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
