"""The protocol's description agrees with itself, and the daemon's small parts do what they say
(no daemon process here: these are quick)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon import protocol
from daemon.settings import confine, load_settings
from daemon.store import Store
from daemon.token import ensure_token, token_matches
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_schema_is_the_generated_one():
    assert protocol.shipped_schema() == protocol.json_schema(), "run: python -m daemon.protocol > daemon/protocol.schema.json"


def _doc_examples(direction: str) -> list[dict]:
    text = (REPO / "docs" / "protocol.md").read_text()
    return [json.loads(block) for block in re.findall(rf"```json {direction}\n(.*?)```", text, re.S)]


def test_every_documented_client_example_is_valid():
    examples = _doc_examples("client")
    assert {m["type"] for m in examples} >= {"info", "submit", "subscribe", "list", "get", "stop", "logs"}
    for msg in examples:
        protocol.validate(msg)


def test_every_documented_server_example_has_its_required_fields():
    examples = _doc_examples("server")
    assert len(examples) >= 8
    for msg in examples:
        assert msg["v"] == 1 and msg["type"] in protocol.SERVER_MESSAGES, msg
        missing = [f for f in protocol.SERVER_MESSAGES[msg["type"]] if f not in msg]
        assert not missing, (msg["type"], missing)
        if msg["type"] == "event":
            assert msg["kind"] in protocol.EVENT_KINDS
        if msg["type"] == "error":
            assert msg["code"] in protocol.ERROR_CODES


def test_validation_names_the_field():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode(json.dumps({"v": 1, "type": "logs", "job": "j", "offset": "0", "id": "x"}))
    assert (err.value.code, err.value.field, err.value.request_id) == ("bad_message", "offset", "x")
    assert protocol.decode('{"v": 1, "type": "subscribe", "job": "j", "after": 3}')["after"] == 3


def test_token_file_created_private_and_tightened(tmp_path):
    path = tmp_path / "state" / "token"
    token = ensure_token(path)
    assert path.stat().st_mode & 0o777 == 0o600 and ensure_token(path) == token
    path.chmod(0o644)
    assert ensure_token(path) == token and path.stat().st_mode & 0o777 == 0o600
    assert token_matches(token, token) and not token_matches(token[:-1], token) and not token_matches(None, token)


def test_settings_file_and_refusals(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.yaml").write_text("port: 9000\nwrite_roots: [~/Lora]\nmax_parallel_jobs: 2\n")
    s = load_settings(state, port=9100)
    assert s.port == 9100 and s.max_parallel_jobs == 2 and s.write_roots == [(Path.home() / "Lora").resolve()]
    assert s.host_allowlist(9100) == {"127.0.0.1:9100", "localhost:9100", "[::1]:9100"}
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_settings(state, host="0.0.0.0")
    (state / "config.yaml").write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown daemon setting 'prot'"):
        load_settings(state)


def test_confine_follows_links_and_dots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    assert confine(root / "sub" / "new", [root], "output_dir", "write") is None
    assert "outside" in confine(root / "sub" / ".." / ".." / "x", [root], "output_dir", "write")
    assert "outside" in confine(root / "link" / "x", [root], "output_dir", "write")
    assert "outside" in confine(tmp_path / "rootless", [root], "output_dir", "write")  # prefix is not a parent


def test_store_numbers_events_per_job_and_survives_reopening(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    a = store.create_job(name="a", task="sd", priority=0, spec={}, jobs_dir=tmp_path)
    b = store.create_job(name="b", task="sd", priority=3, spec={}, jobs_dir=tmp_path)
    for kind in ("queued", "started", "progress"):
        store.add_event(a["id"], kind, {})
    store.add_event(b["id"], "queued", {}, state="running")
    store.close()
    store = Store(tmp_path / "db.sqlite3")
    assert [e["seq"] for e in store.events(a["id"])] == [1, 2, 3]
    assert [e["kind"] for e in store.events(a["id"], after=1)] == ["started", "progress"]
    assert store.get(b["id"])["state"] == "running" and store.get(b["id"])["last_seq"] == 1
    assert [j["id"] for j in store.queue()] == [a["id"]]


def test_recovery_requeues_running_jobs_and_finishes_those_with_a_result(tmp_path):
    from daemon.jobs import JobManager
    from daemon.settings import Settings

    settings = Settings(state_dir=tmp_path)
    store = Store(settings.db_path)
    cut = store.create_job(name="cut", task="sd", priority=0, spec={}, jobs_dir=settings.jobs_dir)
    done = store.create_job(name="done", task="sd", priority=0, spec={}, jobs_dir=settings.jobs_dir)
    for job in (cut, done):
        store.add_event(job["id"], "queued", {}, state="running", attempts=1, pid=12345)
    Path(done["job_dir"]).mkdir(parents=True)
    result = {"lora": "/x/done.safetensors", "deployed": [], "lora_name": "done", "steps": 4}
    (Path(done["job_dir"]) / "result.json").write_text(json.dumps(result))

    JobManager(settings, store).recover()
    assert [e["kind"] for e in store.events(cut["id"])] == ["queued", "interrupted", "queued"]
    assert store.get(cut["id"])["state"] == "queued" and store.get(cut["id"])["pid"] is None
    assert [e["kind"] for e in store.events(done["id"])] == ["queued", "finished"]
    assert store.get(done["id"])["state"] == "finished" and store.get(done["id"])["result"] == result

    settings.resume_interrupted = False
    store.update(cut["id"], state="running")
    JobManager(settings, store).recover()
    assert store.get(cut["id"])["state"] == "failed" and store.get(cut["id"])["error_cause"] == "interrupted"
