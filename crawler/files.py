"""Files and folders that hold patient data: created readable by their owner only.

The state (every resource it synced), run folders, NDJSON files and audit reports carry patient
names and IDs. Whatever the process umask, the tool creates such files 0600 and folders 0700
(the umask can only take more away). Folders that exist already are left as they are: they are
the operator's.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import IO, BinaryIO, Literal, TextIO, overload

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def make_folder(path: Path) -> None:
    """Create ``path`` and any missing parents, each 0700; an existing folder is left as it is."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            if not folder.is_dir():
                # a file where a folder must go: not the "exists already" of a run folder
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None


def make_new_folder(path: Path) -> None:
    """Create ``path`` (0700, parents as ``make_folder``); FileExistsError when it exists already,
    so that a run never writes into a folder it did not create."""
    make_folder(path.parent)
    os.mkdir(path, FOLDER_MODE)


@overload
def open_private(path: Path, mode: Literal["w"]) -> TextIO: ...
@overload
def open_private(path: Path, mode: Literal["wb"] = "wb") -> BinaryIO: ...
def open_private(path: Path, mode: str = "wb") -> IO[str] | IO[bytes]:
    """``open(path, mode)`` for ``w`` or ``wb``: truncated, and created 0600 when new."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_private writes only (w, wb), not {mode!r}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        if mode == "wb":
            return os.fdopen(fd, "wb")
        return os.fdopen(fd, "w", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise


def make_private(path: Path) -> None:
    """Take group and other permissions away from an existing file of ours (a state written by an
    earlier version); a file that is not ours, or not there, is left alone."""
    try:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, info.st_mode & 0o700)
    except OSError:
        pass
