"""Flux jobs through a real daemon (issue 19): refused at submit in one line when a transformer file comes
without its separate files or a path lies outside the roots; an fp8 transformer file with block swap
trains in the daemon's worker and is deployed into a loras folder like an SD LoRA."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, collect
from safetensors import safe_open

from shared.client import DaemonError


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    yield proc
    proc.stop()


def job_config(tiny_flux, image_dir, tmp_path, **overrides) -> dict:
    values = dict(base_model=tiny_flux["transformer_fp8"], flux_ae=tiny_flux["ae"], flux_clip_l=tiny_flux["clip_l"],
                  flux_t5xxl=tiny_flux["t5xxl_fp8"], model_config=tiny_flux["model_config"], train_data_dir=image_dir,
                  output_dir=tmp_path / "out" / "daemon_flux", resolution=64, batch_size=2, max_train_steps=2,
                  save_steps=0, t5_max_length=16, preview=False, fp8_base="true", blocks_to_swap=2,
                  cache_dir=tmp_path / "cache")
    values.update(overrides)
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}


@pytest.mark.slow
def test_a_flux_job_is_checked_at_submit_then_trains_and_deploys(daemon, tiny_flux, image_dir, tmp_path):
    with daemon.client() as client:
        with pytest.raises(DaemonError) as err:
            client.submit(job_config(tiny_flux, image_dir, tmp_path, flux_ae=None), source="flux.yaml")
        assert err.value.code == "invalid_config" and "\n" not in str(err.value)
        assert str(err.value).startswith("flux.yaml: flux_ae: needed: base_model ")
        assert "ae.safetensors (ComfyUI: models/vae; Forge: models/VAE)" in str(err.value)
        outside = Path(tempfile.mkdtemp(prefix="lora-daemon-outside-"))
        try:
            shutil.copy(tiny_flux["ae"], outside / "ae.safetensors")
            with pytest.raises(DaemonError) as err:
                client.submit(job_config(tiny_flux, image_dir, tmp_path, flux_ae=outside / "ae.safetensors"))
        finally:
            shutil.rmtree(outside, ignore_errors=True)
        assert err.value.code == "path_not_allowed" and err.value.field == "config.flux_ae"
        assert client.jobs() == []

        loras = tmp_path / "models" / "Lora"
        job = client.submit(job_config(tiny_flux, image_dir, tmp_path), source="flux.yaml",
                            deploy_dirs=[str(loras)])
        assert job["task"] == "flux" and job["spec"]["config"]["t5_tokenizer"] == str(tiny_flux["t5_tokenizer"])
        events = collect(client, job["id"])
        log = client.logs(job["id"])
    kinds = [e["kind"] for e in events]
    assert kinds[-1] == "finished", events[-1]
    result = events[-1]["data"]
    assert result["task"] == "flux" and result["steps"] == 2
    deployed = Path(result["deployed"][0])
    assert deployed == loras / "daemon_flux.safetensors" and deployed.with_suffix(".json").is_file()
    with safe_open(str(deployed), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_fp8_base"] == "True"
    assert "fp8 base on, 2 blocks swapped" in log["text"], log["text"][-2000:]
