"""Atomic file writes: nothing the user had is lost when a write fails half-way (disk full, Ctrl-C, a crash).

    with atomic_write(path) as f:   # a temporary file in the same folder
        f.write(...)
    # on success: flushed, fsynced, then moved over ``path`` with os.replace (readers see the old or the new file,
    # never a mix); on any failure, KeyboardInterrupt included: the temporary file is removed, ``path`` untouched.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

# the temporary files atomic_write makes: ".{name}.{pid}.{8 hex}.tmp" (the pid tells whether its writer still lives)
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file opened with ``mode`` ("wb" or "w") that replaces ``path`` only once it is complete."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes a whole new file: mode 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, temp_name(os.path.basename(path)))
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


def temp_name(name: str, pid: int | None = None) -> str:
    """The temporary name atomic_write uses for a file ``name`` written by process ``pid`` (default: this one)."""
    return f".{name}.{os.getpid() if pid is None else pid}.{secrets.token_hex(4)}.tmp"


def remove_orphan_temps(folder) -> list[Path]:
    """Remove the temporary files that killed writers (kill -9, a power cut) left in ``folder``; return them.

    Only names of atomic_write's own pattern are touched, and only those whose writing process no longer exists:
    a write in progress, by this or another live process, is left alone. A missing folder has none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file() or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True
