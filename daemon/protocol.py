"""The daemon's wire protocol: versioned JSON messages, their fields, and their validation.

One table below describes every message a client may send; `validate` checks a decoded message
against it and `json_schema()` turns it into the JSON Schema shipped as `protocol.schema.json`
(a test keeps the two identical). docs/protocol.md has the prose and examples.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from shared.client import PROTOCOL_VERSION

# field type names: "string", "integer", "boolean", "object", "string[]"
# Integers are bounded (SQLite stores 64-bit ones; a log read asks for at most 16 MiB).
INT_LIMIT = 2**53
MAX_LOG_READ = 16 * 2**20
_JOB = {"job": {"type": "string", "required": True, "help": "a job id"}}

CLIENT_MESSAGES: dict[str, dict[str, dict[str, Any]]] = {
    "info": {},
    "ping": {},
    "submit": {
        "config": {"type": "object", "required": True,
                   "help": "training config keys, as in a `train --config` YAML (for kind label: label options)"},
        "kind": {"type": "string", "help": "train (default) or label (caption a folder of images with CLIP)"},
        "base_dir": {"type": "string", "help": "absolute folder that relative paths in config are relative to"},
        "source": {"type": "string", "help": "name of the config (file) used in error messages"},
        "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000,
                     "help": "higher runs first; default 0"},
        "deploy_dirs": {"type": "string[]", "help": "extra Lora folders to place the finished file in"},
        "dry_run": {"type": "boolean", "help": "only validate the config and dataset, in a worker, and report "
                                               "as a job does (no training, no files); default false"},
    },
    "list": {
        "states": {"type": "string[]", "help": "only jobs in these states"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100_000,
                  "help": "at most this many jobs, newest first; default 100"},
    },
    "get": _JOB,
    "subscribe": {
        **_JOB,
        "after": {"type": "integer", "minimum": 0, "maximum": INT_LIMIT, "help": "send the events after this sequence number; default 0"},
    },
    "unsubscribe": _JOB,
    "stop": _JOB,
    "cancel": _JOB,
    "delete": _JOB,
    "logs": {
        **_JOB,
        "offset": {"type": "integer", "minimum": 0, "maximum": INT_LIMIT,
                   "help": "byte offset in the log file to read from"},
        "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_LOG_READ,
                      "help": "at most this many bytes; default 1 MiB"},
    },
}

# What the daemon sends: type -> required fields (replies also echo the request's "id").
SERVER_MESSAGES: dict[str, list[str]] = {
    "welcome": ["protocol", "version"],
    "info": ["protocol", "version", "devices", "queue"],
    "pong": [],
    "submitted": ["job"],
    "jobs": ["jobs"],
    "job": ["job"],
    "subscribed": ["job", "last_seq"],
    "unsubscribed": ["job"],
    "stopping": ["job"],
    "cancelled": ["job"],
    "deleted": ["job"],
    "logs": ["job", "text", "offset", "size"],
    "event": ["job", "seq", "kind", "data", "time"],
    "heartbeat": ["time"],
    "error": ["code", "message"],
}

EVENT_KINDS = ("queued", "started", "progress", "checkpoint", "sample", "finished", "failed", "cancelled",
               "interrupted", "stopping", "buckets", "cached")

ERROR_CODES = {
    "bad_json": "the frame is not a JSON object (or is nested too deep, or holds invalid Unicode)",
    "unsupported_version": "field v is missing or not a protocol version this daemon speaks",
    "bad_message": "a field is missing, unknown or of the wrong type",
    "unknown_type": "no such message type",
    "not_found": "no job with that id",
    "invalid_config": "the training config was refused (same message as `train --config`)",
    "path_not_allowed": "a path is outside the folders the daemon config allows",
    "bad_state": "the job is not in a state that allows this (e.g. delete while running)",
    "internal": "a bug in the daemon; the connection stays up",
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, request_id: Any = None):
        super().__init__(message)
        self.code = code
        self.field = field
        self.request_id = request_id

    def to_message(self) -> dict:
        return error_message(self.code, str(self), self.field, self.request_id)


def error_message(code: str, message: str, field: str | None = None, request_id: Any = None) -> dict:
    msg = {"v": PROTOCOL_VERSION, "type": "error", "code": code, "message": message}
    if field:
        msg["field"] = field
    if request_id is not None:
        msg["id"] = request_id
    return msg


def decode(frame: str | bytes) -> dict:
    """Parse and validate one client frame. Raises ProtocolError with a code and a one-line message."""
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_json", f"not UTF-8 text: {exc}") from None
    if _nesting(frame) > MAX_NESTING:
        raise ProtocolError("bad_json", f"nested deeper than {MAX_NESTING} levels")
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"expected a JSON object, got {type(msg).__name__}")
    try:  # "\ud800" escapes decode to lone surrogates, which no file name or log line can hold
        json.dumps(msg, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_json", "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); send valid "
                                        "Unicode") from None
    validate(msg)
    return msg


MAX_NESTING = 64  # configs are flat; deep nesting only costs the parser stack and memory


def _nesting(text: str) -> int:
    """How deep brackets nest, counted without parsing (brackets inside strings count too, which
    only over-estimates). A regex-free scan: cheap next to json.loads on the same text."""
    if text.count("[") + text.count("{") <= MAX_NESTING:  # C-speed counts settle almost every frame
        return 0
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def validate(msg: dict) -> None:
    request_id = msg.get("id")
    if request_id is not None and (not isinstance(request_id, (str, int)) or isinstance(request_id, bool)
                                   or len(str(request_id)) > 64):
        raise ProtocolError("bad_message", "id must be a string or integer of at most 64 characters", "id")

    def fail(code: str, message: str, field: str | None = None):
        raise ProtocolError(code, message, field, request_id)

    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        fail("unsupported_version", f"v must be {PROTOCOL_VERSION} (this daemon speaks protocol "
                                    f"{PROTOCOL_VERSION}), got {version!r}", "v")
    kind = msg.get("type")
    if not isinstance(kind, str):
        fail("bad_message", "type must be a string naming the message", "type")
    if kind not in CLIENT_MESSAGES:
        fail("unknown_type", f"unknown message type {kind!r} (known: {', '.join(CLIENT_MESSAGES)})", "type")
    spec = CLIENT_MESSAGES[kind]
    for name in msg:
        if name not in spec and name not in ("v", "type", "id"):
            fail("bad_message", f"{kind}: unknown field {name!r} (fields: {', '.join(spec) or 'none'})", name)
    for name, rule in spec.items():
        if name not in msg:
            if rule.get("required"):
                fail("bad_message", f"{kind}: missing field {name!r} ({rule['help']})", name)
            continue
        value = msg[name]
        if not _has_type(value, rule["type"]):
            fail("bad_message", f"{kind}: {name} must be {_TYPE_WORDS[rule['type']]}, got {value!r:.80}", name)
        if "minimum" in rule and value < rule["minimum"]:
            fail("bad_message", f"{kind}: {name} must be at least {rule['minimum']}, got {value}", name)
        if rule["type"] == "integer" and value > rule.get("maximum", INT_LIMIT):
            fail("bad_message", f"{kind}: {name} must be at most {rule.get('maximum', INT_LIMIT)}, got {value:.3g}",
                 name)


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "boolean": "true or false", "object": "a JSON object",
               "string[]": "a list of strings"}


def _has_type(value: Any, type_name: str) -> bool:
    if type_name == "string":
        return isinstance(value, str) and value != ""
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "boolean":
        return isinstance(value, bool)
    if type_name == "object":
        return isinstance(value, dict)
    if type_name == "string[]":
        return isinstance(value, list) and all(isinstance(x, str) and x for x in value)
    raise AssertionError(type_name)


def encode(msg: dict) -> str:
    return json.dumps({"v": PROTOCOL_VERSION, **msg}, default=str)


# --- JSON Schema ------------------------------------------------------------------------------

_SCHEMA_TYPES = {
    "string": {"type": "string", "minLength": 1},
    "integer": {"type": "integer"},
    "boolean": {"type": "boolean"},
    "object": {"type": "object"},
    "string[]": {"type": "array", "items": {"type": "string", "minLength": 1}},
}


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of both directions, built from the tables above."""
    common = {
        "v": {"const": PROTOCOL_VERSION},
        "id": {"type": ["string", "integer"], "maxLength": 64},
    }
    client = {}
    for kind, spec in CLIENT_MESSAGES.items():
        props = {**common, "type": {"const": kind}}
        for name, rule in spec.items():
            prop = {**_SCHEMA_TYPES[rule["type"]], "description": rule["help"]}
            if "minimum" in rule:
                prop["minimum"] = rule["minimum"]
            if rule["type"] == "integer":
                prop["maximum"] = rule.get("maximum", INT_LIMIT)
            props[name] = prop
        client[kind] = {
            "type": "object",
            "properties": props,
            "required": ["v", "type", *[n for n, r in spec.items() if r.get("required")]],
            "additionalProperties": False,
        }
    server = {}
    for kind, required in SERVER_MESSAGES.items():
        props = {**common, "type": {"const": kind}}
        if kind == "event":
            props["kind"] = {"enum": list(EVENT_KINDS)}
            props["seq"] = {"type": "integer", "minimum": 1}
        if kind == "error":
            props["code"] = {"enum": list(ERROR_CODES)}
        server[kind] = {"type": "object", "properties": props, "required": ["v", "type", *required]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/lora-daemon/lora-daemon/daemon/protocol.schema.json",
        "title": f"lora-daemon websocket protocol v{PROTOCOL_VERSION}",
        "$defs": {
            **{f"client_{k}": v for k, v in client.items()},
            **{f"server_{k}": v for k, v in server.items()},
            "client_message": {"oneOf": [{"$ref": f"#/$defs/client_{k}"} for k in client]},
            "server_message": {"oneOf": [{"$ref": f"#/$defs/server_{k}"} for k in server]},
        },
        "oneOf": [{"$ref": "#/$defs/client_message"}, {"$ref": "#/$defs/server_message"}],
    }


def shipped_schema() -> dict:
    return json.loads((resources.files("daemon") / "protocol.schema.json").read_text(encoding="utf-8"))


if __name__ == "__main__":  # regenerate the shipped file: python -m daemon.protocol > daemon/protocol.schema.json
    print(json.dumps(json_schema(), indent=2))
