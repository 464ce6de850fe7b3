"""A job's outputs are committed exactly once, whatever is killed when (issue 15).

The publish journal (shared/training/commit.py, shared/files.py) first, with a kill simulated at each
moment of a publish; then the daemon killed after the deploy but before it recorded the result, and
killed in the middle of the deploy: the re-run of the job completes what the first attempt began,
under the same names, and no second copy (`name_2`) ever appears. Before the journal the first case
trained the job again and deployed `name_2` beside the complete copy, and the second left the first
attempt's file in output_dir and published `name_2` there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from daemon_harness import DaemonProcess, collect, wait_until

from shared import files
from shared.faults import FAULT_ENV, MARK_ENV
from shared.training.commit import Journal


class _Cfg:
    """The two things a journal reads of a config."""

    def __init__(self, **values):
        self.values = {"output_dir": "/o", "resume": None, **values}

    def to_dict(self):
        return dict(self.values)


def _journal(tmp_path, *, rerun=True, **values) -> Journal:
    return Journal.open(tmp_path / "job" / "publish.json", _Cfg(**values), rerun=rerun)


def _publish(folder: Path, payload: bytes = b"lora"):
    sidecars = {".json": lambda p, name: Path(p).write_text(json.dumps({"name": name}))}
    return files.publish_new(folder, "mine", ".safetensors", lambda p, name: Path(p).write_bytes(payload), sidecars)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


class Killed(BaseException):
    """What the test raises where a SIGKILL would land (BaseException: nothing may catch it)."""


def test_a_publish_killed_between_its_links_is_completed_under_the_same_name(tmp_path, monkeypatch):
    folder = tmp_path / "Lora"
    real_link = files._link_new

    def killed_at_the_main_file(tmp, target):
        if target.suffix == ".safetensors":
            raise Killed
        return real_link(tmp, target)

    monkeypatch.setattr(files, "_link_new", killed_at_the_main_file)
    with pytest.raises(Killed), files.journaled(_journal(tmp_path)):
        _publish(folder)
    assert _visible(folder) == ["mine.json"]  # a sidecar alone (and the main file's hidden temporary)

    monkeypatch.setattr(files, "_link_new", real_link)
    with files.journaled(_journal(tmp_path)):  # the re-run reads the journal from disk
        path = _publish(folder)
    assert path == folder / "mine.safetensors"
    assert _visible(folder) == ["mine.json", "mine.safetensors"]  # not mine_2, and the sidecar written once


def test_a_publish_killed_after_its_last_link_is_not_written_again(tmp_path, monkeypatch):
    folder = tmp_path / "Lora"
    journal = _journal(tmp_path)
    real_record = journal.record

    def killed_before_done(key, **fields):
        if fields.get("done"):
            raise Killed
        real_record(key, **fields)

    monkeypatch.setattr(journal, "record", killed_before_done)
    with pytest.raises(Killed), files.journaled(journal):
        _publish(folder, b"first attempt")
    with files.journaled(_journal(tmp_path)):
        path = _publish(folder, b"second attempt")
    assert path.read_bytes() == b"first attempt"  # what the first attempt placed stays, and is the output
    assert _visible(folder) == ["mine.json", "mine.safetensors"]


def test_a_name_another_program_took_meanwhile_is_left_alone(tmp_path, monkeypatch):
    folder = tmp_path / "Lora"
    real_link = files._link_new
    monkeypatch.setattr(files, "_link_new", lambda tmp, target: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed), files.journaled(_journal(tmp_path)):
        _publish(folder)
    (folder / "mine.safetensors").write_bytes(b"someone else's")
    monkeypatch.setattr(files, "_link_new", real_link)
    with files.journaled(_journal(tmp_path)):
        path = _publish(folder)
    assert path == folder / "mine_2.safetensors"
    assert (folder / "mine.safetensors").read_bytes() == b"someone else's"


def test_a_folder_published_before_a_kill_is_reused(tmp_path):
    parent = tmp_path / "loras"
    with files.journaled(_journal(tmp_path)):
        first = files.publish_new_folder(parent, "adapter", lambda p: (p / "a.txt").write_text("1"))
    with files.journaled(_journal(tmp_path)):
        again = files.publish_new_folder(parent, "adapter", lambda p: (p / "a.txt").write_text("2"))
    assert first == again == parent / "adapter" and (again / "a.txt").read_text() == "1"
    assert _visible(parent) == ["adapter"]


def test_a_journal_is_only_reused_by_a_rerun_of_the_same_job(tmp_path):
    folder = tmp_path / "Lora"
    with files.journaled(_journal(tmp_path)):
        _publish(folder)
    with files.journaled(_journal(tmp_path, seed=2)):  # another job into the same folders: a new name
        assert _publish(folder).name == "mine_2.safetensors"
    with files.journaled(_journal(tmp_path, rerun=False)):  # the same job run again, not as a re-run
        assert _publish(folder).name == "mine_3.safetensors"


# --- through the daemon -----------------------------------------------------------------------------


def _job(sd_config, tmp_path, name: str) -> dict:
    config = sd_config(max_train_steps=4, save_steps=2, output_name=name, output_dir=tmp_path / "out" / name,
                       deploy_dir=tmp_path / "Lora")
    return yaml.safe_load(config.read_text())


def _kill_at(tmp_path, tmp_path_factory, sd_config, fault: str, name: str):
    """Submit a job (deploy_dir plus a client Lora folder), SIGKILL the daemon while its worker is held
    at `fault`, start the daemon again, and wait for the re-run. (events, job)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    daemon = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path])
    daemon.env = {MARK_ENV: str(marks), FAULT_ENV: fault}
    try:
        daemon.start()
        with daemon.client() as client:
            job = client.submit(_job(sd_config, tmp_path, name), deploy_dirs=[str(tmp_path / "ClientLora")],
                                source="test")
        wait_until(lambda: next(marks.iterdir(), None), 240, "the worker to reach the moment")
        daemon.kill()
        daemon.env.pop(FAULT_ENV)
        daemon.start()
        with daemon.client(timeout=300) as client:
            events = collect(client, job["id"])
            final = client.get(job["id"])
    finally:
        daemon.stop()
    return events, final


@pytest.mark.slow
def test_a_kill_after_the_deploy_before_the_result_is_recorded_trains_nothing_again(tmp_path, tmp_path_factory,
                                                                                    sd_config):
    events, final = _kill_at(tmp_path, tmp_path_factory, sd_config, "write@*/result.json=sleep:300", "once")
    assert final["state"] == "finished" and final["attempts"] == 2, final
    trained = [e["data"]["step"] for e in events if e["kind"] == "progress"]
    assert trained == [1, 2, 3, 4]  # the re-run trained no step: it found everything committed
    for folder in (tmp_path / "Lora", tmp_path / "ClientLora"):
        assert _visible(folder) == ["once.json", "once.preview.png", "once.safetensors"]
    assert "once.safetensors" in _visible(tmp_path / "out" / "once") and \
        not [n for n in _visible(tmp_path / "out" / "once") if n.startswith("once_")]
    assert final["result"]["deployed"] == [str(tmp_path / "Lora" / "once.safetensors"),
                                          str(tmp_path / "ClientLora" / "once.safetensors")]
    assert "Already trained and published" in (Path(final["job_dir"]) / "job.log").read_text()


@pytest.mark.slow
def test_a_kill_during_the_deploy_completes_it_under_the_same_names(tmp_path, tmp_path_factory, sd_config):
    events, final = _kill_at(tmp_path, tmp_path_factory, sd_config, "write@ClientLora/*.safetensors=sleep:300",
                             "half")
    assert final["state"] == "finished" and final["attempts"] == 2, final
    # output_dir and deploy_dir were published before the kill; the re-run keeps them and adds the last copy
    for folder in (tmp_path / "Lora", tmp_path / "ClientLora"):
        assert _visible(folder) == ["half.json", "half.preview.png", "half.safetensors"]
    assert not [n for n in _visible(tmp_path / "out" / "half") if n.startswith("half_")]
    assert final["result"]["lora_name"] == "half"
