"""The wire protocol's tables, shared by the client and the daemon: the version, the token header, every
message a client may send (with its fields), what the daemon sends, the event kinds and the error codes.

The daemon validates frames against these (daemon/protocol.py) and generates protocol.schema.json from
them; the client (shared/client.py) speaks the same version. Standard library only: the hosts load this
file with the thin client.
"""

from __future__ import annotations

from typing import Any

PROTOCOL_VERSION = 1
TOKEN_HEADER = "X-Lora-Daemon-Token"
TERMINAL_EVENTS = frozenset({"finished", "failed", "cancelled"})
SERVER_NAME = "lora-daemon"  # the daemon's `Server:` header is `lora-daemon/<version>`

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
                   "help": "training config keys, as in a `train --config` YAML (for the other kinds: their options)"},
        "kind": {"type": "string", "help": "train (default), label (caption a folder of images with CLIP) or a LoRA "
                                           "tool: lora_info, lora_resize, lora_merge, lora_extract, lora_convert"},
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
    "deploy": {
        **_JOB,
        "checkpoint": {"type": "integer", "minimum": 0, "maximum": INT_LIMIT,
                       "help": "the step of the saved checkpoint to publish; default: the job's best checkpoint"},
    },
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
    "deployed": ["job", "step", "paths"],
    "logs": ["job", "text", "offset", "size"],
    "event": ["job", "seq", "kind", "data", "time"],
    "heartbeat": ["time"],
    "error": ["code", "message"],
}

EVENT_KINDS = ("queued", "started", "progress", "checkpoint", "sample", "finished", "failed", "cancelled",
               "interrupted", "stopping", "buckets", "cached", "evaluation", "verdict", "memory_plan", "memory_retry")

ERROR_CODES = {
    "bad_json": "the frame is not a JSON object (or is nested too deep, or holds invalid Unicode)",
    "unsupported_version": "field v is missing or not a protocol version this daemon speaks",
    "bad_message": "a field is missing, unknown or of the wrong type",
    "unknown_type": "no such message type",
    "not_found": "no job with that id",
    "invalid_config": "the training config was refused (same message as `train --config`)",
    "path_not_allowed": "a path is outside the folders the daemon config allows",
    "bad_state": "the job is not in a state that allows this (e.g. delete while running, deploy a checkpoint it did "
                 "not keep)",
    "internal": "a bug in the daemon; the connection stays up",
}


