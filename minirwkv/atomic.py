"""Atomic file writes: nothing the user had is lost when a write fails half-way (disk full, Ctrl-C, a crash).

    with atomic_write(path) as f:   # a temporary file in the same folder
        f.write(...)
    # on success: flushed, fsynced, then moved over ``path`` with os.replace (readers see the old or the new file,
    # never a mix); on any failure, KeyboardInterrupt included: the temporary file is removed, ``path`` untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file opened with ``mode`` ("wb" or "w") that replaces ``path`` only once it is complete."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes a whole new file: mode 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open applies the umask, so the file ends with the permissions a plain open() would give it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX); not possible on every system, and not needed for atomicity."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
