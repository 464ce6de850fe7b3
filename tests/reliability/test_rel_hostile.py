"""Hostile clients: what a web page, a DNS-rebinding attack or another local user could send.

Every handshake below must be refused before any message is read (403 for Host and Origin, 401 for
the token); the token file and the state folder are private, tightened if someone loosened them; the daemon listens on
loopback only and refuses a public bind address unless told `allow_remote: true`. (The `.ckpt` with
a pickle payload is in test_rel_bad_inputs.py: refused without running it.)
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, raw_handshake

from daemon.settings import Settings, load_settings
from shared.client import TOKEN_HEADER
from shared.errors import ConfigError

_results: dict[str, bool] = {}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    state = home / "state"
    state.mkdir()
    state.chmod(0o755)  # loosened by someone: the daemon must tighten it at start
    (state / "config.yaml").write_text("max_connections: 4\n")
    token = "t" * 43
    (state / "token").write_text(token + "\n")
    (state / "token").chmod(0o644)  # loosened by someone: the daemon must tighten it at start
    proc = DaemonProcess(state, [home], [home]).start()
    yield proc
    proc.stop()


def attempts(port: int, token: str) -> dict[str, tuple[dict, int]]:
    host = f"127.0.0.1:{port}"
    good = {"Host": host, TOKEN_HEADER: token}
    return {
        "cross-site Origin": ({**good, "Origin": "http://evil.example"}, 403),
        "Origin: null (sandboxed page, file://)": ({**good, "Origin": "null"}, 403),
        "Origin file://": ({**good, "Origin": "file://"}, 403),
        "Origin of the daemon's own address": ({**good, "Origin": f"http://{host}"}, 403),
        "Origin lookalike 127.0.0.1.evil.example": ({**good, "Origin": "http://127.0.0.1.evil.example"}, 403),
        "two Origin headers": ({**good, "Origin": "http://evil.example", "origin": "http://evil.example"}, 403),
        "DNS rebinding Host": ({**good, "Host": f"evil.example:{port}"}, 403),
        "rebinding Host that resolves to loopback": ({**good, "Host": f"127.0.0.1.nip.io:{port}"}, 403),
        "Host without port": ({**good, "Host": "127.0.0.1"}, 403),
        "Host with another port": ({**good, "Host": f"127.0.0.1:{port + 1}"}, 403),
        "Host localhost with a trailing dot": ({**good, "Host": f"localhost.:{port}"}, 403),
        "no Host": ({TOKEN_HEADER: token}, (400, 403)),
        "missing token": ({"Host": host}, 401),
        "empty token": ({"Host": host, TOKEN_HEADER: ""}, 401),
        "wrong token": ({"Host": host, TOKEN_HEADER: "u" * 43}, 401),
        "token prefix": ({"Host": host, TOKEN_HEADER: token[:-1]}, 401),
        "token in the URL instead of a header": ({"Host": host, "X-Path": f"/?token={token}"}, 401),
        "two token headers": ({"Host": host, TOKEN_HEADER: token, TOKEN_HEADER.lower(): token}, 401),
    }


def test_hostile_handshakes_are_refused(daemon, record):
    token = daemon.state_dir.joinpath("token").read_text().strip()
    assert raw_handshake(daemon.port, {"Host": f"127.0.0.1:{daemon.port}", TOKEN_HEADER: token})[0] == 101
    got = {}
    for name, (headers, status) in attempts(daemon.port, token).items():
        got[name] = raw_handshake_lines(daemon.port, headers)
        _results[name] = got[name] in (status if isinstance(status, tuple) else (status,))
    # one connection too many (max_connections: 4 here) is refused, and served again once one closes
    held = [daemon.client() for _ in range(4)]
    got["one connection over max_connections"] = raw_handshake_lines(daemon.port, {
        "Host": f"127.0.0.1:{daemon.port}", TOKEN_HEADER: token})
    _results["one connection over max_connections"] = got["one connection over max_connections"] == 503
    held.pop().close()
    with daemon.client() as client:  # and it is still serving
        assert client.request("ping")["type"] == "pong"
    for client in held:
        client.close()
    record("hostile", handshakes_tried=len(got), handshakes_refused=sum(_results.values()),
           statuses={k: v for k, v in got.items()})
    assert all(_results.values()), got


def raw_handshake_lines(port: int, headers: dict) -> int:
    """raw_handshake, but headers may repeat (case differs) and the path may carry a query."""
    headers = dict(headers)
    path = headers.pop("X-Path", "/")
    import socket

    lines = [f"GET {path} HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = s.recv(4096)
    return int(head.split()[1])


def test_token_file_private_and_loopback_only(daemon, record):
    token_mode = stat.S_IMODE((daemon.state_dir / "token").stat().st_mode)
    state_mode = stat.S_IMODE(daemon.state_dir.stat().st_mode)
    listening = listening_addresses(daemon.port)
    assert raw_handshake(daemon.port, {"Host": f"127.0.0.1:{daemon.port}", TOKEN_HEADER: "t" * 43})[0] == 101
    refusals = {}
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(ConfigError, match="not a loopback address.*allow_remote") as err:
            load_settings(daemon.state_dir.parent / "other-state", host=host)
        refusals[host] = str(err.value)
    record("hostile", token_file_mode=oct(token_mode), state_dir_mode=oct(state_mode),
           default_bind=Settings().host, listening_on=sorted(listening), public_binds_refused=len(refusals))
    assert token_mode == 0o600 and state_mode == 0o700
    assert Settings().host == "127.0.0.1" and listening == {"127.0.0.1"}
    log = Path(daemon.output).read_text()
    assert "was readable by others (mode 644); set to 0600" in log and "(mode 755); set to 0700" in log


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from /proc/net/tcp(6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add("ipv6:" + address)
    return found
