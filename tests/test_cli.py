"""`python -m daemon` as a person runs it: one clear error line for each bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=300
    )


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "train" in out.stdout and "demo" in out.stdout


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_base_model", "missing required key 'base_model'"),
        ("not_a_checkpoint", "model.safetensors: not a readable checkpoint"),
        ("empty_image_folder", "no images in"),
        ("metadata_missing_files", "metadata.csv line 2: image 'nope.png' not found"),
        ("non_numeric_lr", "learning_rate: expected a number, got 'lots'"),
    ],
)
def test_bad_inputs_give_one_clear_line(tmp_path, sd_config, case, expected):
    config = sd_config()
    text = config.read_text()
    if case == "missing_base_model":
        text = "\n".join(line for line in text.splitlines() if not line.startswith("base_model:"))
    elif case == "not_a_checkpoint":
        bogus = tmp_path / "model.safetensors"
        bogus.write_text("hello")
        config = sd_config(base_model=bogus)
        text = config.read_text()
    elif case == "empty_image_folder":
        (tmp_path / "empty").mkdir()
        config = sd_config(train_data_dir=tmp_path / "empty")
        text = config.read_text()
    elif case == "metadata_missing_files":
        folder = tmp_path / "imgs"
        folder.mkdir()
        (folder / "metadata.csv").write_text("file,caption\nnope.png,a caption\n")
        config = sd_config(train_data_dir=folder)
        text = config.read_text()
    elif case == "non_numeric_lr":
        text = text.replace("learning_rate: 0.001", "learning_rate: lots")
    config.write_text(text)
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused job


def test_train_command_writes_the_lora(sd_config, tmp_path):
    proc = run_cli("train", str(sd_config(max_train_steps=2)), "--set", "output_name=cli_lora")
    assert proc.returncode == 0, proc.stderr
    for line in ("Using device: cpu", "Loaded base model from", "Injected LoRA adapters with rank=8",
                 "Training started... total steps: 2"):
        assert line in proc.stdout
    assert (tmp_path / "out" / "my_lora" / "cli_lora.safetensors").is_file()


def test_train_prints_the_evaluations_warning_and_the_report(sd_config, tmp_path):
    config = sd_config(max_train_steps=2, learning_rate=1e-9, evaluation=True, sample_steps=2, eval_sample_steps=2)
    proc = run_cli("train", str(config))
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "out" / "my_lora" / "report.html"
    assert "warning: no visible effect: the LoRA barely changes the pictures (effect score " in proc.stdout
    assert proc.stdout.rstrip().endswith(f"; report: {report}") and report.is_file()


def _unshare_works() -> bool:
    """A user and mount namespace of our own lets the test mount a read-only or a tiny tmpfs, as a
    user's read-only share or full disk would be, without touching the machine's mounts."""
    import shutil

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("mount_options, cause", [("ro,size=1m", "Read-only file system"),
                                                  ("size=64k", "No space left on device")])
def test_a_read_only_or_full_deploy_folder_is_one_line_and_the_lora_stays(tmp_path, sd_config, mount_options,
                                                                           cause):
    if not _unshare_works():
        pytest.skip("no user/mount namespaces here to mount a read-only or full file system")
    deploy = tmp_path / "Lora"
    deploy.mkdir()
    config = sd_config(max_train_steps=1, deploy_dir=deploy, output_name="kept")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = (f'mount -t tmpfs -o {mount_options} tmpfs "{deploy}" && '
              f'exec "{sys.executable}" -m daemon train --config "{config}"')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: deploy_dir: {deploy}: cannot write there: {cause}"), errors[0]
    assert f"the trained LoRA is kept in {tmp_path / 'out' / 'my_lora'}" in errors[0]
    assert (tmp_path / "out" / "my_lora" / "kept.safetensors").is_file()
