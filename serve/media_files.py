"""file:// image URLs of the server, confined to the directories its operator allowed (`--allowed-media-dir`).

A robot's server is often reachable from its Wi-Fi: a client must not make it read any file the process can, nor
learn which paths exist. So a file is served only if what opening it actually reached is a regular file whose real
path (symlinks, `..`, doubled slashes resolved; the URL's percent-encoding undone first) lies inside an allowed
directory's real path, and every other case (outside, missing, a directory, a FIFO, unreadable, a symlink out, a
path swapped between the open and the check) gets the same answer: None, which the request parser turns into one
400 message. The check is made on the opened descriptor: the real path's inode must be the one that was opened, so
nothing can be swapped in after the check. A hard link inside an allowed directory to a file elsewhere is that
file's own path, and is served: only the operator can make one there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class MediaDirError(ValueError):
    """An allowed media directory that is not one."""


def allowed_dirs(dirs) -> tuple[str, ...]:
    """The real paths of the operator's directories, each checked to be an existing directory."""
    out = []
    for d in dirs or ():
        real = os.path.realpath(os.path.expanduser(os.fspath(d)))
        if not os.path.isdir(real):
            raise MediaDirError(f"--allowed-media-dir {d}: not a directory")
        out.append(real)
    return tuple(dict.fromkeys(out))


def _inside(real: str, directory: str) -> bool:
    return real == directory or real.startswith(directory.rstrip(os.sep) + os.sep)


def read_allowed(path: str, allowed: tuple[str, ...], max_bytes: int) -> bytes | None:
    """The file's bytes (at most max_bytes + 1: the caller sees an oversize), or None if it may not be served."""
    if not allowed or not os.path.isabs(path):
        return None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block us
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):  # missing, unreadable, a NUL in the path
        return None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return None
        real = os.path.realpath(path)
        try:
            named = os.stat(real)
        except OSError:
            return None
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino) or not any(
                _inside(real, d) for d in allowed):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def describe(allowed: tuple[str, ...]) -> str:
    """For the server's own log line, never for a client."""
    return ", ".join(str(Path(d)) for d in allowed) or "none (file:// URLs refused)"
