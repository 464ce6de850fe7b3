"""The pre-flight through a real daemon: what it refuses at submit (one line, and no job: no record, no
folder), what it never reveals about files outside its roots, and the config a job then stores."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from daemon_harness import DaemonProcess
from model_headers import llm_job, sd15_layout

from shared.client import DaemonError


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("daemon_preflight")
    # read: the session's fixtures; write: only <home>/allowed (and the daemon's own job folders)
    proc = DaemonProcess(home / "state", [tmp_path_factory.getbasetemp()], [home / "allowed"]).start()
    proc.home = home
    (home / "allowed").mkdir()
    yield proc
    proc.stop()


@pytest.fixture
def outside():
    """A folder outside the daemon's roots (pytest's own folders are all read roots here)."""
    folder = Path(tempfile.mkdtemp(prefix="lora-daemon-outside-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def refused(daemon, config: dict, **submit) -> DaemonError:
    """Submit, expect a refusal, and check that nothing of a job was made."""
    jobs_dir = daemon.state_dir / "jobs"
    folders_before = sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []
    with daemon.client() as client:
        before = [job["id"] for job in client.jobs()]  # ids: an earlier test's dry run may still be running
        with pytest.raises(DaemonError) as err:
            client.submit(config, **submit)
        assert [job["id"] for job in client.jobs()] == before
    assert (sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []) == folders_before
    assert "\n" not in str(err.value)
    return err.value


def sd_job(daemon, sd_config, **overrides) -> dict:
    return yaml.safe_load(sd_config(**{"output_dir": daemon.home / "allowed" / "out", **overrides}).read_text())


def test_what_the_model_family_forbids_is_refused_at_submit(daemon, sd_config, tmp_path):
    sd15 = sd15_layout(tmp_path / "v1-5-layout.safetensors")
    err = refused(daemon, sd_job(daemon, sd_config, base_model=sd15, model_config=None, resolution=520),
                  source="sd15.yaml")
    assert err.code == "invalid_config" and str(err) == (
        "sd15.yaml: resolution 520 is not a multiple of 64, which this SD1.x model needs (its VAE and UNet halve "
        "the image 6 times; its safetensors header); use 512 or 576")
    err = refused(daemon, sd_job(daemon, sd_config, lora_rank=5000), source="rank.yaml")
    assert str(err) == "rank.yaml: lora_rank must be at least 1 and at most 4096, got 5000"
    llm = {**llm_job(tmp_path), "output_dir": str(daemon.home / "allowed" / "tone")}
    err = refused(daemon, {**llm, "train_text_encoder": True}, source="llm.yaml")
    assert str(err).startswith("llm.yaml: train_text_encoder is an SD and Flux setting and does not apply here: base_model ")
    # the same LLM job without the SD key is accepted, its task written into the stored config
    with daemon.client() as client:
        job = client.submit(llm, source="llm.yaml", dry_run=True)
    assert job["task"] == "llm" and job["spec"]["config"]["task"] == "llm"


def test_nothing_outside_the_roots_is_read_or_told(daemon, sd_config, outside):
    secret = outside / "metadata.csv"
    secret.write_text("SECRET-FIRST-LINE,with a caption\n")
    err = refused(daemon, sd_job(daemon, sd_config, metadata_path=secret), source="job.yaml")
    assert err.code == "path_not_allowed" and err.field == "config.metadata_path"
    assert "SECRET" not in str(err) and str(err).startswith(f"metadata_path: {secret} is outside the folders")
    # base_model outside the roots: the same answer whether or not the file is there
    (outside / "there.safetensors").write_bytes(b"x")
    answers = [refused(daemon, sd_job(daemon, sd_config, base_model=outside / name), source="job.yaml")
               for name in ("there.safetensors", "missing.safetensors")]
    assert [(e.code, e.field) for e in answers] == [("path_not_allowed", "config.base_model")] * 2
    assert str(answers[0]).replace("there", "missing") == str(answers[1])
    # the latent cache is written: a folder the daemon may only read is refused
    readable = Path(sd_config().parent) / "cache"
    err = refused(daemon, sd_job(daemon, sd_config, cache_latents="disk", cache_dir=readable), source="job.yaml")
    assert err.code == "path_not_allowed" and "outside the folders this daemon may write" in str(err)


def test_a_name_from_output_dir_follows_the_name_rule(daemon, sd_config):
    err = refused(daemon, sd_job(daemon, sd_config, output_dir=daemon.home / "allowed" / "x" / ".."),
                  source="job.yaml")
    assert err.code == "invalid_config" and "output_dir: the LoRA is named after the last part of output_dir ('..')" \
        in str(err)


def test_a_job_stores_the_config_it_was_checked_with(daemon, sd_config):
    config = sd_job(daemon, sd_config)
    del config["output_dir"]
    config["output_name"] = "in_its_folder"
    with daemon.client() as client:
        job = client.submit(config, source="job.yaml", dry_run=True)
    job_dir = Path(job["job_dir"])
    stored = job["spec"]["config"]
    # checked with the job's own folder (no placeholder changed afterwards); every key, task resolved
    assert stored["output_dir"] == str(job_dir / "output") and stored["task"] == "sd"
    assert set(stored) == set(yaml.safe_load((job_dir / "config.yaml").read_text())) and len(stored) > 70
    assert not (daemon.state_dir / "jobs" / "_pending").exists()


def test_a_preset_is_applied_at_submit_and_its_family_checked(daemon, sd_config):
    """The daemon path expands `preset` before the values are checked (as `train` does): the stored config
    has the preset's keys under the user's; a preset of another family is refused in one line."""
    config = sd_job(daemon, sd_config, preset="sd15-style-8gb", lora_rank=4)
    with daemon.client() as client:
        job = client.submit(config, source="styled.yaml", dry_run=True)
    stored = job["spec"]["config"]
    assert stored["preset"] == "sd15-style-8gb" and stored["lora_alpha"] == 8 and stored["random_flip"] is True
    assert stored["lora_rank"] == 4 and stored["learning_rate"] == 1e-3  # the user's keys win
    err = refused(daemon, sd_job(daemon, sd_config, preset="sdxl-style-12gb"), source="xl.yaml")
    assert err.code == "invalid_config" and str(err).startswith(
        "xl.yaml: preset sdxl-style-12gb is for SDXL models, but base_model is an SD1.x model")
    assert str(err).endswith("use one of sd15-character-8gb, sd15-style-8gb")
