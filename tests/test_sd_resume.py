"""Checkpoints and resume: kill a training process after a checkpoint, continue with `resume: latest`,
and end at the same step count, losses and weights as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import ConfigError
from shared.preflight import load_config
from shared.train import run_training
from shared.training import state as ckpt

REPO = Path(__file__).resolve().parent.parent


def _lora(path):
    return {k: v for k, v in load_file(str(path)).items()}


def test_resume_after_kill_reaches_the_same_end(sd_config, tmp_path):
    steps = 24
    common = dict(max_train_steps=steps, save_steps=3, save_last_n=2, lora_dropout=0.1, batch_size=2)
    reference = run_training(load_config(sd_config(**common, output_dir=tmp_path / "ref" / "run")))

    out = tmp_path / "killed" / "run"
    config = sd_config(**common, output_dir=out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "train", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not ckpt.list_states(out / "checkpoints") and time.time() < deadline:
            assert proc.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "run.safetensors").exists(), "the process finished before it was killed"
    killed_at = ckpt.list_states(out / "checkpoints")[-1][0]
    assert 3 <= killed_at < steps

    resumed = run_training(load_config(sd_config(**common, output_dir=out, resume="latest")))
    assert resumed.steps == reference.steps == steps
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    a, b = _lora(resumed.output_path), _lora(reference.output_path)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    states = [s for s, _ in ckpt.list_states(out / "checkpoints")]
    assert states == [18, 21]  # save_last_n keeps the newest two
    files = sorted(p.name for p in (out / "checkpoints").glob("*.safetensors"))
    assert files == ["run-step000018.safetensors", "run-step000021.safetensors"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_latest_without_a_state_starts_fresh(sd_config, tmp_path):
    result = run_training(load_config(sd_config(max_train_steps=2, resume="latest")))
    assert result.steps == 2


def test_resume_from_a_folder_that_is_not_a_state(sd_config, tmp_path):
    with pytest.raises(ConfigError, match="not a training state folder"):
        run_training(load_config(sd_config(max_train_steps=2, resume="state-step000999")))


def test_resume_is_a_name_not_a_path(sd_config, tmp_path):
    # a path would let a daemon job read outside its allowed folders
    with pytest.raises(ConfigError, match="not a path"):
        run_training(load_config(sd_config(max_train_steps=2, resume=str(tmp_path))))


def test_an_interrupted_state_save_leaves_nothing_behind(tmp_path):
    class Broken:
        def state_dict(self):
            raise KeyboardInterrupt  # as if the process were stopped mid-save

    gen = torch.Generator().manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_state(tmp_path, 5, lora={"x": torch.zeros(1)}, optimizer=Broken(), scheduler=Broken(),
                        rng=ckpt.rng_state(gen), trainer={})
    assert list(tmp_path.iterdir()) == []
    assert ckpt.resolve_resume("latest", tmp_path) is None


def test_a_stopped_run_saves_a_state_that_resume_continues(sd_config, tmp_path):
    from shared.reporting import Reporter

    class StopAfterTwo(Reporter):
        step = 0

        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "progress":
                self.step = data["step"]

        def stop_requested(self):
            return self.step >= 2

    config = sd_config(max_train_steps=5, save_steps=0)
    stopped = run_training(load_config(config), StopAfterTwo())
    assert stopped.stopped_early and stopped.steps == 2
    assert [s for s, _ in ckpt.list_states(stopped.output_path.parent / "checkpoints")] == [2]
    resumed = run_training(load_config(sd_config(max_train_steps=5, save_steps=0, resume="latest")))
    assert resumed.steps == 5 and len(resumed.losses) == 5
    assert resumed.losses[:2] == stopped.losses
