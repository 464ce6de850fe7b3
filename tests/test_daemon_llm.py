"""An LLM job through the daemon: the adapter folder lands in every deploy folder, copied whole."""

from __future__ import annotations

import pytest
from daemon_harness import DaemonProcess, collect

from tests.llm_fixtures import llm_values


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    yield proc
    proc.stop()


def test_llm_job_deploys_the_adapter_folder(daemon, tiny_llama, chat_data, tmp_path):
    values = llm_values(tiny_llama, chat_data, tmp_path / "out", max_train_steps=6, output_name="tone")
    values = {k: str(v) if hasattr(v, "is_dir") else v for k, v in values.items()}
    models = tmp_path / "adapters"
    (models / "tone").mkdir(parents=True)  # someone's adapter of the same name: kept
    (models / "tone" / "keep.txt").write_text("mine")
    with daemon.client() as client:
        job = client.submit(values, deploy_dirs=[str(models)])
        events = collect(client, job["id"])
    assert events[-1]["kind"] == "finished", events[-1]
    result = events[-1]["data"]
    assert result["task"] == "llm"
    deployed = [p for p in result["deployed"]]
    assert deployed == [str(models / "tone_2")]
    assert (models / "tone_2" / "adapter_config.json").is_file()
    assert (models / "tone_2" / "adapter_model.safetensors").is_file()
    assert (models / "tone" / "keep.txt").read_text() == "mine"
