"""Where comfytrio may put a file: names from users and from servers never leave their folder.

One rule for every name that comes from outside: a LoRA or image name a user gives, an
output's sub-folder and file name a server reports (whether the file is read in place on a
local instance or downloaded from a remote one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ._errors import UnsafeNameError

__all__ = ["CONTROL_CHARACTERS", "MAX_NAME_BYTES", "fits", "output_path", "safe_join"]

MAX_NAME_BYTES = 255
"""The longest file name (one path component, in bytes) file systems take."""

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
"""NUL, newlines and the other control characters: never in a name we accept."""

_DRIVE = re.compile(r"^[A-Za-z]:")


def fits(part: str) -> bool:
    """Whether the file system can store ``part`` as one path component: encodable, at most
    ``MAX_NAME_BYTES`` bytes."""
    try:
        return len(os.fsencode(part)) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any ``name`` that could land outside ``folder``.

    ``name`` may hold sub-folders separated by ``/``. Refused with ``UnsafeNameError``: an
    empty name, an absolute path, a ``..`` or ``.`` or empty component, a backslash, a
    drive letter, a NUL or other control character, a component longer than
    ``MAX_NAME_BYTES`` bytes or one the file system cannot encode. The check is on the name
    alone (no I/O).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(str(name), str(folder))
    if "\\" in name or CONTROL_CHARACTERS.search(name) or _DRIVE.match(name):
        raise UnsafeNameError(name, str(folder))
    if PurePosixPath(name).is_absolute():
        raise UnsafeNameError(name, str(folder))
    parts = name.split("/")
    if any(part in ("", ".", "..") or not fits(part) for part in parts):
        raise UnsafeNameError(name, str(folder))
    return folder.joinpath(*parts)


def output_path(folder: Path, subfolder: str, filename: str) -> Path:
    """Where a server's output (``subfolder``, ``filename`` as ComfyUI reports them) is, or
    goes, inside ``folder``: ``safe_join`` of the two, a Windows server's backslashes read as
    separators."""
    name = "/".join(p for p in (subfolder, filename) if p)
    return safe_join(folder, name.replace("\\", "/"))
