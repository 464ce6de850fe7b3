"""Auto-label as a daemon job: queued like training, progress events, captions written, paths confined."""

from __future__ import annotations

import pytest
from daemon_harness import DaemonProcess, collect

from shared.client import DaemonError
from shared.fixtures.images import make_image_folder
from shared.sd.dataset import scan_dataset


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
