"""EMA through the loop, and resume with what issue 20 adds to a state (issue 20): the EMA weights differ
from the trained ones and are what checkpoints and the published LoRA hold; a stop then `resume: latest`
ends where an unbroken run ends with EMA on, with Prodigy (its step-size estimate lives in the optimizer
state), with schedule-free AdamW and with LoHa on per-block learning rates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import ConfigError
from shared.preflight import load_config
from shared.sd.task import SDTask
from shared.train import run_training
from shared.training import state as states
from shared.training.precision import setup_precision
from tests.test_llm_training import Recorder

COMMON = dict(max_train_steps=6, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, save_steps=0)


def _written(cfg, values_in_order) -> dict:
    """The LoRA file the task writes with these values in its trained tensors (in their order)."""
    task = SDTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    trained = task.trainable()
    assert len(trained) == len(values_in_order)
    with torch.no_grad():
        for tensor, value in zip(trained.values(), values_in_order):
            tensor.copy_(value)
    return task.tensors()


def test_ema_weights_differ_and_are_the_ones_written(sd_config, tmp_path):
    cfg = load_config(sd_config(use_ema=True, ema_decay=0.9, max_train_steps=8, save_steps=3, lora_dropout=0.0,
                                learning_rate=5e-3, preview=False))
    result = run_training(cfg, Recorder(stop_at=4))
    assert result.stopped_early and result.steps == 4
    checkpoints = tmp_path / "out" / "my_lora" / "checkpoints"
    for step, written in ((3, checkpoints / "my_lora-step000003.safetensors"), (4, result.output_path)):
        state = states.load_state(checkpoints / states.state_name(step))
        shadows = state["extras"]["ema"]["ema"]["shadow_params"]
        raw = list(state["lora"][name] for name in _order(cfg))
        assert any(not torch.equal(s, r) for s, r in zip(shadows, raw))  # the average lags the weights
        file = load_file(str(written))
        assert all(torch.equal(file[k], v) for k, v in _written(cfg, shadows).items()), step
        assert any(not torch.equal(file[k], v) for k, v in _written(cfg, raw).items())


def _order(cfg) -> list[str]:
    task = SDTask(cfg, Recorder())
    task.load(setup_precision(cfg)[1])
    return list(task.trainable())


VARIANTS = {
    "ema": dict(use_ema=True, ema_decay=0.9),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0, optimizer_args={"d_coef": 2.0, "safeguard_warmup": True}),
    "schedulefree": dict(optimizer="adamw_schedulefree", lr_warmup_steps=2),
    "loha-blocks": dict(lora_type="loha", lycoris_rank_dropout=0.1, lora_dropout=0.0, down_lr_weight="linear",
                        mid_lr_weight=0.5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stop_then_resume_equals_an_unbroken_run(sd_config, tmp_path, variant):
    def job(name, **more):
        return load_config(sd_config(output_dir=tmp_path / name / "job", **{**COMMON, **VARIANTS[variant], **more}))

    whole_events = Recorder()
    whole = run_training(job("whole"), whole_events)
    stopped = run_training(job("parts"), Recorder(stop_at=3))
    assert stopped.stopped_early and stopped.steps == 3
    rec = Recorder()
    resumed = run_training(job("parts", resume="latest"), rec)
    assert [d["step"] for k, d in rec.events if k == "started"] == [3]
    assert resumed.steps == whole.steps == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a, b = load_file(str(whole.output_path)), load_file(str(resumed.output_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-6)
    # the reported rate continues too (Prodigy's d x lr: its estimate came back with the optimizer state)
    rates = [[d["lr"] for k, d in r.events if k == "progress"] for r in (whole_events, rec)]
    assert rates[1] == pytest.approx(rates[0][3:], rel=1e-4)


def test_a_state_without_ema_is_not_resumed_with_ema(sd_config, tmp_path):
    run_training(load_config(sd_config(**COMMON)), Recorder(stop_at=3))
    with pytest.raises(ConfigError, match="was trained with other settings \\(use_ema: state has None, config has "
                                          "True\\)"):
        run_training(load_config(sd_config(**COMMON, use_ema=True, resume="latest")))
