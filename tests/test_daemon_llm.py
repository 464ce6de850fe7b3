"""An LLM job through the daemon: the adapter folder lands in every deploy folder, copied whole (its
llama.cpp files too); the deploy keys and preference rows are checked at submit."""

from __future__ import annotations

import json

import pytest
from daemon_harness import DaemonProcess, collect

from shared.client import DaemonError
from tests.llm_fixtures import llm_values


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    yield proc
    proc.stop()


def test_llm_job_deploys_the_adapter_folder(daemon, tiny_llama, chat_data, tmp_path):
    values = llm_values(tiny_llama, chat_data, tmp_path / "out", max_train_steps=6, output_name="tone",
                        gguf_adapter=True)
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
    assert (models / "tone_2" / "tone-lora.gguf").read_bytes() == (tmp_path / "out" / "tone" / "tone-lora.gguf").read_bytes()
    assert (models / "tone" / "keep.txt").read_text() == "mine"


def test_deploy_keys_and_preference_rows_are_checked_at_submit(daemon, tiny_llama, chat_data, tmp_path,
                                                                 tmp_path_factory):
    values = llm_values(tiny_llama, chat_data, tmp_path / "out", output_name="tone")
    values = {k: str(v) if hasattr(v, "is_dir") else v for k, v in values.items()}
    readable_only = tmp_path_factory.mktemp("webui") / "text-generation-webui"  # a read root, not a write root
    (readable_only / "user_data" / "loras").mkdir(parents=True)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"instruction": "a", "chosen": "b", "rejected": "c"}) + "\n" +
                     json.dumps({"instruction": "a", "chosen": "b", "rejected": "b"}) + "\n")
    with daemon.client() as client:
        with pytest.raises(DaemonError) as err:
            client.submit({**values, "textgen_dir": str(readable_only)})
        assert (err.value.code, err.value.field) == ("path_not_allowed", "config.textgen_dir")
        with pytest.raises(DaemonError) as err:
            client.submit({**values, "train_data_dir": str(prefs), "objective": "dpo"})
        assert err.value.code == "invalid_config"
        assert str(err.value) == f"{prefs} line 2: `chosen` and `rejected` are the same answer; nothing to prefer"
        assert client.jobs() == []
