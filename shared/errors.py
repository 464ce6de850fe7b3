"""Errors meant for the person running the trainer.

A `UserError` carries one line that names the file, key or field at fault and what to do about it.
The CLI prints it without a traceback; the daemon sends it to the client as the job's error.
"""

import errno
from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix. `str(err)` is the whole message."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, missing or points at nothing."""


class DatasetError(UserError):
    """The training data cannot be used as given."""


class ModelError(UserError):
    """The base model cannot be loaded or is of an architecture we do not train."""


class WriteError(UserError, OSError):
    """A file could not be placed in a folder: read-only, not writable by this user, or the disk is full.

    One line naming the folder and the cause. It is also an `OSError` with the original `errno`, so
    code that tells a full disk apart (the daemon's `disk_full` cause) still can."""

    ADVICE = {
        "EROFS": "the folder is on a read-only file system: choose another folder",
        "EACCES": "this user may not write there: choose another folder or fix its permissions",
        "EPERM": "this user may not write there: choose another folder or fix its permissions",
        "ENOSPC": "the disk is full: free some space",
        "EDQUOT": "the disk quota is used up: free some space",
    }

    def __init__(self, folder, cause: OSError):
        OSError.__init__(self, cause.errno, cause.strerror, cause.filename)
        self.folder = Path(folder)
        advice = self.ADVICE.get(errno.errorcode.get(cause.errno or 0, ""))
        what = cause.strerror or str(cause)
        self.message = f"{self.folder}: cannot write there: {what}{f' ({advice})' if advice else ''}"

    def __str__(self) -> str:
        return self.message
