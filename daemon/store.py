"""The job queue's memory: jobs and their events in SQLite (WAL), so a restart loses nothing.

Only the server process writes here (workers send their events over a pipe and the server stores
them), so there is one writer and no lock contention. Each job's events are numbered 1, 2, 3, ...
(`seq`); a client that reconnects asks for the events after the last number it saw.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("finished", "failed", "cancelled")
STATES = (*ACTIVE_STATES, *FINAL_STATES)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_order INTEGER NOT NULL,
    name TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    progress TEXT,
    result TEXT,
    error TEXT,
    error_cause TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    last_seq INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, created_order);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

_JSON_COLUMNS = ("spec", "progress", "result")


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit transactions
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def new_job_id() -> str:
        """A fresh job id (time and 24 random bits), before the job exists: the daemon checks a config with
        the job's own folder in it and stores the job only if the check passes."""
        return time.strftime("%Y%m%d-%H%M%S-", time.localtime()) + secrets.token_hex(3)

    def create_job(self, *, name: str, task: str, priority: int, spec: dict, jobs_dir: Path,
                   job_id: str | None = None) -> dict:
        now = time.time()
        job_id = job_id or self.new_job_id()
        job_dir = Path(jobs_dir) / job_id
        with self.db:
            order = self.db.execute("SELECT COALESCE(MAX(created_order), 0) + 1 FROM jobs").fetchone()[0]
            self.db.execute(
                "INSERT INTO jobs (id, created_order, name, task, state, priority, spec, job_dir, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, order, name, task, priority, json.dumps(spec), str(job_dir), now, now),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, states: list[str] | None = None, limit: int = 100) -> list[dict]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_order DESC LIMIT ?", (*states, limit)
            )
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created_order DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def queue(self) -> list[dict]:
        """Queued jobs in the order they will run: higher priority first, then first come."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY priority DESC, created_order")
        return [_job(r) for r in rows]

    def update(self, job_id: str, **values: Any) -> dict:
        values["updated_at"] = time.time()
        for key in _JSON_COLUMNS:
            if key in values and values[key] is not None:
                values[key] = json.dumps(values[key])
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.db:
            self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # --- events ---------------------------------------------------------------------------------

    def add_event(self, job_id: str, kind: str, data: dict, **job_updates: Any) -> dict:
        """Append an event with the job's next sequence number, together with any job column updates
        (one transaction, so a job's state and its history never disagree)."""
        now = time.time()
        with self.db:
            seq = self.db.execute(
                "UPDATE jobs SET last_seq = last_seq + 1, updated_at = ? WHERE id = ? RETURNING last_seq",
                (now, job_id),
            ).fetchone()[0]
            self.db.execute(
                "INSERT INTO events (job_id, seq, kind, data, time) VALUES (?, ?, ?, ?, ?)",
                (job_id, seq, kind, json.dumps(data), now),
            )
            if job_updates:
                for key in _JSON_COLUMNS:
                    if key in job_updates and job_updates[key] is not None:
                        job_updates[key] = json.dumps(job_updates[key])
                assignments = ", ".join(f"{k} = ?" for k in job_updates)
                self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*job_updates.values(), job_id))
        return {"job": job_id, "seq": seq, "kind": kind, "data": data, "time": now}

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        rows = self.db.execute(
            "SELECT seq, kind, data, time FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
        )
        return [{"job": job_id, "seq": r["seq"], "kind": r["kind"], "data": json.loads(r["data"]), "time": r["time"]}
                for r in rows]


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    for key in _JSON_COLUMNS:
        job[key] = json.loads(job[key]) if job[key] else None
    job["stop_requested"] = bool(job["stop_requested"])
    del job["created_order"]
    return job
