"""The daemon's side of the wire protocol: decoding and validating client frames, encoding replies.

The tables (every message a client may send, what the daemon sends, event kinds, error codes and the
protocol version) live in shared/protocol.py, which the client shares. `validate` checks a decoded
message against them and `json_schema()` turns them, with the job-config schema generated from
shared/schema, into the JSON Schema shipped as `protocol.schema.json` (a test keeps the two identical).
docs/protocol.md has the prose and examples.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from shared.protocol import (  # noqa: F401 - re-exported: the daemon's code and tests read them here
    CLIENT_MESSAGES,
    ERROR_CODES,
    EVENT_KINDS,
    INT_LIMIT,
    MAX_LOG_READ,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
)
from shared.schema import JOB_KINDS
from shared.schema.json_schema import config_schema


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
    # a submit's config: a training config, or the options of the job `kind` names (label, lora_resize, ...)
    others = [kind for kind in JOB_KINDS if kind != "train"]
    client["submit"]["properties"]["kind"]["enum"] = list(JOB_KINDS)
    client["submit"]["if"] = {"properties": {"kind": {"enum": others}}, "required": ["kind"]}
    client["submit"]["then"] = {"allOf": [
        {"if": {"properties": {"kind": {"const": kind}}},
         "then": {"properties": {"config": {"$ref": f"#/$defs/{options_def(kind)}"}}}} for kind in others]}
    client["submit"]["else"] = {"properties": {"config": {"$ref": "#/$defs/train_config"}}}
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
            "train_config": config_schema("train"),
            **{options_def(kind): config_schema(kind) for kind in JOB_KINDS if kind != "train"},
            "client_message": {"oneOf": [{"$ref": f"#/$defs/client_{k}"} for k in client]},
            "server_message": {"oneOf": [{"$ref": f"#/$defs/server_{k}"} for k in server]},
        },
        "oneOf": [{"$ref": "#/$defs/client_message"}, {"$ref": "#/$defs/server_message"}],
    }


def options_def(kind: str) -> str:
    """The `$defs` name of a non-training job's options: label_options, lora_resize_options, ..."""
    return f"{kind}_options"


def shipped_schema() -> dict:
    return json.loads((resources.files("daemon") / "protocol.schema.json").read_text(encoding="utf-8"))


if __name__ == "__main__":  # regenerate the shipped file: python -m daemon.protocol > daemon/protocol.schema.json
    print(json.dumps(json_schema(), indent=2))
