"""Writing files people and hosts read: never half a file, never over someone else's file.

A file is written to a hidden temporary name in the target folder, flushed to disk, and only then
given its real name. `publish_new` links it under a name that does not exist yet (`os.link` fails
rather than replace), so a host's Lora folder never shows a partial file and nothing in it is
overwritten; ComfyUI caches LoRAs by path, so reusing a name would also serve stale weights.

Inside `journaled(journal)` (shared/training/commit.py) every `publish_new` / `publish_new_folder` call
also records the name it chose, the hashes of what it is about to link, and when it is done, so a run
killed half-way and started again writes each output under the same name exactly once.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import itertools
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from shared import faults
from shared.errors import WriteError

# What a folder the user cannot write to (read-only mount, permissions, full disk) raises: these become
# one `WriteError` naming the folder. Any other OSError (a source file that vanished, say) stays as it is.
_FOLDER_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}
# Writers in Rust (safetensors) report the OS error only in their text: "I/O error: ... (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def _writing_into(folder: Path):
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        elsewhere = exc.filename and Path(os.fsdecode(exc.filename)).is_absolute() and \
            not Path(os.fsdecode(exc.filename)).resolve().is_relative_to(Path(folder).resolve())
        if exc.errno in _FOLDER_ERRNOS and not elsewhere:  # not a source file it was reading
            raise WriteError(folder, exc) from None
        raise
    except Exception as exc:
        found = _RUST_OS_ERROR.search(str(exc))
        if found and int(found[1]) in _FOLDER_ERRNOS:
            code = int(found[1])
            raise WriteError(folder, OSError(code, os.strerror(code))) from None
        raise


def _discard(path: Path) -> None:
    """Remove a temporary after a failure. Never raises: on a read-only file system even removing a
    file that was never created fails (EROFS, not ENOENT), and that must not hide the real error."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


# Names of the temporaries above and of replace_folder's old copies: what a killed writer leaves.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.(tmp|old)$")


def _named_after(name: str, stem: str) -> bool:
    return name == stem or name.startswith((f"{stem}.", f"{stem}_", f"{stem}-"))


def remove_leftovers(folder: Path, stem: str | None = None) -> list[Path]:
    """Delete the hidden temporaries a killed writer left in `folder`; with `stem`, only those of files
    named after it (`stem.safetensors`, `stem_2...`): a shared Lora folder may hold another program's
    file being written right now."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or (stem is not None and not _named_after(match["name"], stem)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _write_temp(target: Path, write: Callable[[Path], None]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        write(tmp)
        faults.hit("write", f"{target.parent.name}/{target.name}")  # tests: a kill or full disk right here
        # Some writers (safetensors) create 0600 files; a host running as another user must read it.
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def atomic_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Write via `write(tmp_path)`, then atomically replace `target` (for files the trainer owns)."""
    target = Path(target)
    tmp = _write_temp(target, write)
    os.replace(tmp, target)
    return target


def _link_new(tmp: Path, target: Path) -> bool:
    """Give `tmp` the name `target` unless that exists. True on success."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError:
        # No hard links here (some network or FAT file systems): reserve the name with O_EXCL.
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, target)
        return True
    tmp.unlink()
    return True


# The journal of the job now publishing (shared/training/commit.py), or None: what publish_new and
# publish_new_folder consult so that a re-run after a kill reuses the names an earlier attempt chose.
_JOURNAL: contextvars.ContextVar = contextvars.ContextVar("publish_journal", default=None)


@contextlib.contextmanager
def journaled(journal):
    """Publish through `journal` (an object with `entry(key)` and `record(key, **fields)`) meanwhile."""
    token = _JOURNAL.set(journal)
    try:
        yield journal
    finally:
        _JOURNAL.reset(token)


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def candidate_stems(stem: str):
    yield stem
    n = 2
    while True:
        yield f"{stem}_{n}"
        n += 1


def publish_new(
    folder: Path,
    stem: str,
    main_suffix: str,
    write_main: Callable[[Path, str], None],
    sidecars: dict[str, Callable[[Path, str], None]] | None = None,
) -> Path:
    """Write `stem<main_suffix>` (or `stem_2`, `stem_3`, ... if taken) into `folder`.

    `write_main(tmp_path, final_stem)` writes the file; it learns the final stem so the file can
    carry its own name (the LoRA alias). Sidecars (suffix -> writer) take the same stem and appear
    before the main file, so a host that sees the LoRA also sees its preview and notes.
    """
    folder = Path(folder)
    with _writing_into(folder):
        return _publish_new(folder, stem, main_suffix, write_main, sidecars or {})


def _publish_new(folder: Path, stem: str, main_suffix: str, write_main, sidecars: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    journal, key = _JOURNAL.get(), f"file:{folder.resolve() / stem}{main_suffix}"
    earlier = journal.entry(key) if journal else None
    if earlier:  # an earlier attempt of this job chose a name: finish what it began, under that name
        found = _earlier_file(folder, earlier, main_suffix)
        if found is not None:
            journal.record(key, done=True)
            return found
    candidates = candidate_stems(stem)
    if earlier:
        candidates = itertools.chain([earlier["stem"]], candidates)
    suffixes = [main_suffix, *sidecars]
    for candidate in candidates:
        if any((folder / f"{candidate}{s}").exists() for s in suffixes):
            continue
        if journal:
            journal.record(key, stem=candidate, hashes={}, done=False)
        # Every file is complete (as a hidden temporary) before the first one gets its name: a writer
        # killed or failing mid-way (a full disk) leaves no sidecar without its LoRA.
        temps: dict[str, Path] = {}
        try:
            for suffix, writer in sidecars.items():
                temps[suffix] = _write_temp(folder / f"{candidate}{suffix}", lambda p, w=writer, c=candidate: w(p, c))
            temps[main_suffix] = _write_temp(folder / f"{candidate}{main_suffix}",
                                             lambda p, c=candidate: write_main(p, c))
        except BaseException:
            for tmp in temps.values():
                _discard(tmp)
            raise
        if journal:  # what is ours, should a kill come between the links
            journal.record(key, hashes={suffix: file_digest(tmp) for suffix, tmp in temps.items()})
        placed: list[Path] = []
        for suffix in [*sidecars, main_suffix]:  # the main file last: a host that sees it sees its sidecars
            target = folder / f"{candidate}{suffix}"
            if not _link_new(temps[suffix], target):
                break
            del temps[suffix]
            placed.append(target)
        else:
            if journal:
                journal.record(key, done=True)
            return folder / f"{candidate}{main_suffix}"
        for tmp in temps.values():  # lost a race for this name: take back what we placed, try the next
            _discard(tmp)
        for path in placed:
            path.unlink()
    raise AssertionError("unreachable")


def _earlier_file(folder: Path, entry: dict, main_suffix: str) -> Path | None:
    """The main file an earlier attempt placed, or None. Files it linked before it was killed, before
    its main file, are taken back (they are ours when their hash is the one it recorded): the name is
    then written again, whole."""
    hashes = entry.get("hashes") or {}
    main = folder / f"{entry['stem']}{main_suffix}"
    if main.exists():
        if entry.get("done") or (main_suffix in hashes and file_digest(main) == hashes[main_suffix]):
            return main
        return None  # another program's file has the name now: a new one is chosen
    for suffix, digest in hashes.items():
        path = folder / f"{entry['stem']}{suffix}"
        if path.is_file() and file_digest(path) == digest:
            path.unlink()
    return None


def publish_new_folder(parent: Path, stem: str, write: Callable[[Path], None]) -> Path:
    """Write a folder (an LLM adapter, a merged model) as `parent/stem`, or `stem_2`, ... if taken.

    `write(tmp_dir)` fills a hidden temporary folder beside the target, which is then renamed into
    place: readers never see a half-written folder, and an existing folder is never replaced (a
    rename onto a non-empty folder fails, and then the next free name is tried).
    """
    parent = Path(parent)
    with _writing_into(parent):
        return _publish_new_folder(parent, stem, write)


def _publish_new_folder(parent: Path, stem: str, write: Callable[[Path], None]) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    journal, key = _JOURNAL.get(), f"dir:{parent.resolve() / stem}"
    earlier = journal.entry(key) if journal else None
    if earlier and (earlier.get("done") or earlier.get("renaming")) and (parent / earlier["stem"]).is_dir():
        journal.record(key, done=True)  # an earlier attempt of this job placed it
        return parent / earlier["stem"]
    tmp = parent / f".{stem}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        candidates = candidate_stems(stem)
        if earlier:
            candidates = itertools.chain([earlier["stem"]], candidates)
        for candidate in candidates:
            target = parent / candidate
            if target.exists():
                continue
            if journal:
                journal.record(key, stem=candidate, renaming=True, done=False)
            try:
                os.rename(tmp, target)
            except OSError:  # taken since the check (non-empty on POSIX, any folder on Windows)
                if target.exists():
                    continue
                raise
            if journal:
                journal.record(key, done=True)
            return target
    except BaseException:
        _discard(tmp)
        raise
    raise AssertionError("unreachable")


def replace_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder the trainer owns (a checkpoint) via a temporary folder, replacing an older one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
