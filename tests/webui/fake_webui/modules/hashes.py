"""As modules/hashes.py: a file's sha256, kept in `<data folder>/cache.json` under a title so the
WebUI hashes each checkpoint once (the first time it loads it), not at every start."""

import hashlib
import json
import os

from modules import paths

CACHE = os.path.join(paths.data_path, "cache.json")


def _read() -> dict:
    try:
        with open(CACHE, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def sha256_from_cache(filename, title):
    """The cached hash, or None while the file was never hashed (or changed since)."""
    entry = _read().get("hashes", {}).get(title)
    if not entry or entry.get("mtime") != os.path.getmtime(filename):
        return None
    return entry["sha256"]


def sha256(filename, title):
    cached = sha256_from_cache(filename, title)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(filename, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    data = _read()
    data.setdefault("hashes", {})[title] = {"mtime": os.path.getmtime(filename), "sha256": digest.hexdigest()}
    with open(CACHE, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return digest.hexdigest()
