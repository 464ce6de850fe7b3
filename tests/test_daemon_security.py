"""What the daemon refuses: foreign origins and hosts, missing tokens, paths outside its folders, bad
configs, and malformed messages (each answered with a structured error; the daemon stays up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon_harness import REPO, DaemonProcess, raw_handshake, wait_until
from websockets.exceptions import ConnectionClosed

from shared.client import TOKEN_HEADER, DaemonClient, DaemonError
from shared.errors import ConfigError
from shared.preflight import load_config


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    home = tmp_path_factory.mktemp("daemon_security")
    # write_roots: only <home>/allowed; read_roots: the session's fixtures, not the repo
    proc = DaemonProcess(home / "state", [base], [home / "allowed"], extra=["--heartbeat", "0.3"]).start()
    proc.home = home
    yield proc
    proc.stop()


def handshake(daemon, **overrides) -> tuple[int, str]:
    headers = {"Host": f"127.0.0.1:{daemon.port}", TOKEN_HEADER: daemon.token}
    headers.update(overrides)
    return raw_handshake(daemon.port, {k: v for k, v in headers.items() if v is not None})


def test_handshake_checks(daemon):
    assert handshake(daemon)[0] == 101
    assert handshake(daemon, Host=f"localhost:{daemon.port}")[0] == 101
    # a browser page elsewhere, a sandboxed page, DNS rebinding, and no or a wrong token
    assert handshake(daemon, Origin="http://evil.example") == (403, "Origin not allowed\n")
    assert handshake(daemon, Origin="null")[0] == 403
    assert handshake(daemon, Origin=f"http://127.0.0.1:{daemon.port}")[0] == 403  # not in allowed_origins
    assert handshake(daemon, Host=f"evil.example:{daemon.port}") == (403, "Host not allowed\n")
    assert handshake(daemon, Host="127.0.0.1:1")[0] == 403
    status, body = handshake(daemon, **{TOKEN_HEADER: None})
    assert status == 401 and str(daemon.state_dir / "token") in body
    assert handshake(daemon, **{TOKEN_HEADER: daemon.token[:-1] + "x"})[0] == 401
    # the same through the client library a user would use
    with pytest.raises(DaemonError, match="401"):
        DaemonClient(f"ws://127.0.0.1:{daemon.port}", token="wrong", timeout=5).open()
    with pytest.raises(DaemonError, match="Origin not allowed"):
        DaemonClient(f"ws://127.0.0.1:{daemon.port}", daemon.token, timeout=5, origin="http://evil.example").open()


def test_token_file_is_private(daemon):
    assert (daemon.state_dir / "token").stat().st_mode & 0o777 == 0o600
    assert len(daemon.token) >= 32


def test_paths_outside_the_allowed_folders_are_refused(daemon, sd_config, tmp_path):
    allowed = daemon.home / "allowed"
    allowed.mkdir(exist_ok=True)
    escape = allowed / "escape"  # a link inside the allowed folder that points out of it
    if not escape.exists():
        escape.symlink_to(daemon.home / "elsewhere", target_is_directory=True)
    cases = {
        "output_dir": dict(output_dir=daemon.home / "elsewhere" / "out"),
        "deploy_dir": dict(output_dir=allowed / "out", deploy_dir=escape / "Lora"),
        "log_dir": dict(output_dir=allowed / "out", log_dir=allowed / ".." / "logs"),
        "train_data_dir": dict(output_dir=allowed / "out", train_data_dir=REPO / "shared" / "demo" / "images"),
    }
    with daemon.client() as client:
        for key, overrides in cases.items():
            config = yaml.safe_load(sd_config(**overrides).read_text())
            with pytest.raises(DaemonError) as err:
                client.submit(config, source="job.yaml")
            assert err.value.code == "path_not_allowed" and err.value.field == f"config.{key}"
            assert str(err.value).startswith(f"{key}: ") and "is outside the folders this daemon may" in str(err.value)
        good = yaml.safe_load(sd_config(output_dir=allowed / "out").read_text())
        with pytest.raises(DaemonError) as err:
            client.submit(good, deploy_dirs=["/etc"])
        assert err.value.code == "path_not_allowed" and "/etc is outside" in str(err.value)
        assert client.jobs() == []  # nothing was queued
    assert not (daemon.home / "elsewhere").exists()


def test_bad_config_is_refused_at_once_with_the_cli_message(daemon, sd_config):
    config = sd_config(output_dir=daemon.home / "allowed" / "out")
    config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: lots"))
    with pytest.raises(ConfigError) as expected:
        load_config(config)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "daemon", "submit", str(config), "--state-dir", str(daemon.state_dir),
                           "--port", str(daemon.port)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {expected.value}"
    with daemon.client() as client:
        data = yaml.safe_load(config.read_text())
        data["lerning_rate"] = data.pop("learning_rate")
        with pytest.raises(DaemonError) as err:
            client.submit(data, source="mine.yaml", base_dir=config.parent)
        assert err.value.code == "invalid_config"
        assert str(err.value) == "mine.yaml: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"
        data["learning_rate"] = data.pop("lerning_rate")
        data["train_data_dir"] = "images"  # relative, and no base_dir to resolve it against
        with pytest.raises(DaemonError, match="train_data_dir: 'images' is a relative path"):
            client.submit(data)
        assert client.jobs() == []


MALFORMED = [
    ("not json", "bad_json", None),
    ("[1, 2]", "bad_json", None),
    (json.dumps({"type": "info"}), "unsupported_version", "v"),
    (json.dumps({"v": 99, "type": "info"}), "unsupported_version", "v"),
    (json.dumps({"v": 1, "type": "fly", "id": "m1"}), "unknown_type", "type"),
    (json.dumps({"v": 1, "id": "m2"}), "bad_message", "type"),
    (json.dumps({"v": 1, "type": "get", "id": "m3"}), "bad_message", "job"),
    (json.dumps({"v": 1, "type": "get", "job": 5, "id": "m4"}), "bad_message", "job"),
    (json.dumps({"v": 1, "type": "subscribe", "job": "x", "after": -1, "id": "m5"}), "bad_message", "after"),
    (json.dumps({"v": 1, "type": "list", "colour": "red", "id": "m6"}), "bad_message", "colour"),
    (json.dumps({"v": 1, "type": "submit", "config": [], "id": "m7"}), "bad_message", "config"),
    (json.dumps({"v": 1, "type": "get", "job": "nope", "id": "m8"}), "not_found", "job"),
    (json.dumps({"v": 1, "type": "cancel", "job": "nope", "id": "m9"}), "not_found", "job"),
    (b"\xff\xfe binary", "bad_json", None),
]


def test_malformed_messages_get_structured_errors_and_the_connection_stays(daemon):
    with daemon.client() as client:
        for frame, code, field in MALFORMED:
            client.send_raw(frame)
            reply = client._recv(10)
            while reply["type"] == "heartbeat":
                reply = client._recv(10)
            assert reply["type"] == "error" and reply["code"] == code, (frame, reply)
            assert reply.get("field") == field and reply["message"], (frame, reply)
            sent = json.loads(frame) if isinstance(frame, str) and frame.startswith("{") else {}
            assert reply.get("id") == sent.get("id")
        assert client.request("ping")["type"] == "pong"  # same connection, still answering
        # heartbeats arrive on an idle connection
        assert any(client._recv(5)["type"] == "heartbeat" for _ in range(3))

    # a frame over the size limit closes that connection (1009) but not the daemon
    with daemon.client() as big:
        big.send_raw(json.dumps({"v": 1, "type": "ping", "pad": "x" * (2 << 20)}))
        with pytest.raises((ConnectionClosed, DaemonError)):
            for _ in range(20):
                big._recv(10)
    with daemon.client() as client:
        assert client.info()["version"]


def test_the_server_never_imports_torch(daemon, sd_config, tmp_path):
    """Import and use the server's modules with torch made unimportable."""
    config = sd_config(output_dir=tmp_path / "out")
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, NoTorch())
import yaml
from pathlib import Path
import daemon.server, daemon.jobs, daemon.cli, daemon.remote, shared.client
from shared.preflight import check
checked = check(yaml.safe_load(open({str(config)!r})), source="c.yaml", require_absolute=True)
assert checked.task == "sd" and checked.config.task == "sd"
daemon.cli.build_parser()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    maps = Path(f"/proc/{daemon.proc.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()


def test_no_log_at_any_level_holds_the_token(tmp_path, caplog):
    """websockets logs every handshake header at DEBUG: a WebUI started with `--loglevel DEBUG` (the
    client side) or a daemon run under debug logging (the server side) must not write the token."""
    import logging

    state = tmp_path / "state"
    proc = DaemonProcess(state, [tmp_path], [tmp_path])  # not started: its port, token and client only
    # the daemon's own process with the root logger at DEBUG, as `logging.basicConfig(level=DEBUG)` gives
    args = [sys.executable, "-c", "import logging, sys; logging.basicConfig(level=logging.DEBUG); "
            "from daemon.cli import main; sys.exit(main(sys.argv[1:]))",
            "serve", "--state-dir", str(state), "--port", str(proc.port)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = open(tmp_path / "daemon.out", "wb")  # noqa: SIM115 - the child holds it
    server = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    out.close()
    try:
        def up():
            try:
                proc.client(timeout=5).close()
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        with caplog.at_level(logging.DEBUG):
            wait_until(up, 60, "the daemon to accept connections", interval=0.2)
            with proc.client() as client:
                assert client.info()["version"]
        token = proc.token
    finally:
        server.terminate()
        server.wait(15)
    client_log = caplog.text
    server_log = (tmp_path / "daemon.out").read_text()
    assert f"{TOKEN_HEADER}: <redacted>" in client_log  # the header line is logged, its value is not
    assert f"{TOKEN_HEADER}: <redacted>" in server_log
    assert token not in client_log and token not in server_log
