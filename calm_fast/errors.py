"""The kinds of error a user can fix (a bad config, metadata, input file, permission or checkpoint; weights
that do not fit the model), which `calm-fast` prints as one line naming the file instead of a traceback.

Every such error derives from `UserError` (or is an OSError about a named file: missing, not permitted,
disk full); anything else is a bug and keeps its traceback. `calm_fast.cli` decides, in one place, for
every subcommand; `calm_fast.console.user_error` prints the line. This module is the lowest layer, so
that the config, the data readers and the loaders can all raise these types.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem in what the user gave calm-fast; the message names the file (and line) or the setting."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that is unreadable, incomplete, not calm-fast's, or refused as unsafe."""


class WeightsMismatchError(UserError, ValueError):
    """Weights that do not fit the configured model (another architecture, method or class count)."""


class NonFiniteMapError(UserError, ValueError):
    """A map with NaN or ±inf values (a diverged or broken model): scoring it would print numbers for it."""


class InputFileError(UserError, OSError):
    """An input file (an image, a mask) that exists but cannot be read."""


def not_utf8_message(path, error: UnicodeDecodeError) -> str:
    """`PATH:LINE: not UTF-8 text (...)` for a text file that failed to decode: the line and column of the
    first bad byte, so the user can find it."""
    data = error.object  # the bytes decoded (after a byte-order mark): error.start counts from there
    line_no = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return f"{path}:{line_no}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}: {error.reason})"


# OSErrors about a path the user chose (a missing data folder, a run_dir they may not write, a full disk).
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def is_user_error(error: BaseException) -> bool:
    """True for an error the user can fix from its one-line message (not a bug)."""
    if isinstance(error, UserError):
        return True
    return isinstance(error, _USER_OS_ERRORS) or (isinstance(error, OSError) and error.errno in _USER_ERRNOS)
