"""Auto-label as a daemon job: queued like training, progress events, captions written, paths confined."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, collect

from shared.client import DaemonError
from shared.fixtures.images import make_image_folder
from shared.images.dataset import scan_dataset


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    from shared.fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_daemon"))


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path / "writable"]).start()
    yield proc
    proc.stop()


def test_label_job_captions_a_folder(daemon, clip_files, tmp_path):
    images = make_image_folder(tmp_path / "writable" / "images", count=5, captions="none")
    options = {"input_dir": str(images), "model": str(clip_files["config"]), "weights": str(clip_files["weights"]),
               "device": "cpu", "trigger": "shapes_style"}
    with daemon.client() as client:
        job = client.submit(options, kind="label")
        assert job["task"] == "label" and job["state"] == "queued"
        events = collect(client, job["id"])
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "finished", events[-1]
    assert "started" in kinds and [e["data"]["step"] for e in events if e["kind"] == "progress"][-1] == 5
    result = events[-1]["data"]
    assert len(result["captions"]) == 5
    scan = scan_dataset(images)  # the trainer reads what the job wrote
    assert scan.captioned == 5 and all(item.caption.startswith("shapes_style") for item in scan.items)


def test_label_job_refused_outside_allowed_folders_and_with_bad_options(daemon, clip_files, tmp_path):
    outside = make_image_folder(tmp_path / "not_writable", count=1, captions="none")
    with daemon.client() as client:
        with pytest.raises(DaemonError) as err:
            client.submit({"input_dir": str(outside), "weights": str(clip_files["weights"])}, kind="label")
        assert err.value.code == "path_not_allowed" and "metadata.csv" in str(err.value)
        with pytest.raises(DaemonError) as err:
            client.submit({"input_dir": str(outside), "top_k": "many"}, kind="label")
        assert err.value.code == "invalid_config" and "top_k: expected a whole number" in str(err.value)
        with pytest.raises(DaemonError) as err:
            client.submit({"input_dir": str(outside), "colour": "red"}, kind="label")
        assert "unknown label option 'colour'" in str(err.value)
        assert client.jobs() == []


def test_errors_inside_a_host_name_that_hosts_inputs(tmp_path, tmp_path_factory, monkeypatch):
    """No CLIP weights on this machine: the WebUI tab's error names its fields ("CLIP weights"), never
    the CLI's --weights/--model (the ComfyUI node's: tests/test_comfy_nodes.py)."""
    import sys

    from shared.fixtures.images import make_image_folder

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "extension_webui"))
    from lora_daemon_webui import form

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # the daemon's workers find no weights
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    images = make_image_folder(tmp_path / "images", count=1, captions="none")
    tab_options = form.build_label_options(dataset=str(images), caption_source=form.CAPTION_AUTO, clip_model=None,
                                           clip_weights=None, trigger=None, base_dir=tmp_path)
    try:
        errors = {}
        with daemon.client() as client:
            for host, options in (("tab", tab_options), ("cli-like", {"input_dir": str(images)})):
                job = client.submit(options, kind="label")
                errors[host] = collect(client, job["id"])[-1]["data"]["error"]
    finally:
        daemon.stop()
    assert "no open_clip weights for ViT-B-32" in errors["tab"]
    assert "set CLIP weights to /path/to/open_clip_model.safetensors (a checkpoint for CLIP model ViT-B-32)" \
        in errors["tab"]
    assert "give --weights /path/to/open_clip_model.safetensors" in errors["cli-like"]  # a plain protocol client
