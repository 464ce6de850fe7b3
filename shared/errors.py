"""Errors meant for the person running the trainer.

A `UserError` carries one line that names the file, key or field at fault and what to do about it.
The CLI prints it without a traceback; the daemon sends it to the client as the job's error.
"""


class UserError(Exception):
    """Bad input that the user can fix. `str(err)` is the whole message."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, missing or points at nothing."""


class DatasetError(UserError):
    """The training data cannot be used as given."""


class ModelError(UserError):
    """The base model cannot be loaded or is of an architecture we do not train."""
