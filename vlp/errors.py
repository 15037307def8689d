"""The one base class of the errors vlp reports to a user, and how a command prints them.

Every error that means "the input is wrong" (a config key or value, a model name, a weights file, a shard, a
checkpoint, an index, a query) derives from :class:`VlpError`. The console script catches this class (and the
``OSError`` kinds that mean a bad path) and prints ``error: <message>`` with a non-zero exit code; anything
else is a bug and keeps its traceback. Project errors also derive from the built-in class they refine
(``ValueError``, ``OSError``, ...), so callers that catch those keep working.
"""

from __future__ import annotations

# OSError kinds that, raised while reading the user's paths, mean bad input rather than a bug.
USER_PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, IsADirectoryError,
                                               NotADirectoryError, PermissionError)
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class VlpError(Exception):
    """Base class of every error vlp reports as ``error: <message>`` (the message names what and where)."""


def user_message(err: BaseException) -> str:
    """The message to print for ``err``: its text, without the worker traceback torch's DataLoader prepends to
    an error re-raised from a loader worker (only the worker's last line, the original message, is kept)."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    if WORKER_TRACEBACK not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name, sep, message = last.partition(": ")
    return message if sep and name.replace(".", "").replace("_", "").isalnum() else last
