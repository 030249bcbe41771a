"""Where comfytrio may put a file: names from users and from servers never leave their folder.

One rule for every name that comes from outside: a LoRA or image name a user gives, an
output's sub-folder and file name a server reports (whether the file is read in place on a
local instance or downloaded from a remote one).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ._errors import UnsafeNameError

__all__ = ["output_path", "safe_join"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any ``name`` that could land outside ``folder``.

    ``name`` may hold sub-folders separated by ``/``. Refused with ``UnsafeNameError``: an
    empty name, an absolute path, a ``..`` or ``.`` or empty component, a backslash, a
    drive letter, a NUL or other control character. The check is on the name alone (no I/O).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(str(name), str(folder))
    if "\\" in name or any(ord(c) < 32 for c in name) or _DRIVE.match(name):
        raise UnsafeNameError(name, str(folder))
    if PurePosixPath(name).is_absolute():
        raise UnsafeNameError(name, str(folder))
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeNameError(name, str(folder))
    return folder.joinpath(*parts)


def output_path(folder: Path, subfolder: str, filename: str) -> Path:
    """Where a server's output (``subfolder``, ``filename`` as ComfyUI reports them) is, or
    goes, inside ``folder``: ``safe_join`` of the two, a Windows server's backslashes read as
    separators."""
    name = "/".join(p for p in (subfolder, filename) if p)
    return safe_join(folder, name.replace("\\", "/"))
