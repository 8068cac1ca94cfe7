"""The paths a user names on the command line, checked before any work: a mistake is a one-line ValueError that
names the option, the path and what to pass instead, never an IsADirectoryError traceback after minutes of work.

    existing_file(path, "--checkpoint", "a checkpoint", "best.ckpt")   a file to read
    output_file(path, "--state_out", "state.npz")                       a file to write (its folders made on demand)
    output_folder(path, "--out")                                         a folder to write into
"""
from __future__ import annotations

from pathlib import Path


def existing_file(path, option: str, what: str, example: str, hint: str = "") -> Path:
    """``path`` as a file that exists. ``what`` names the kind of file, ``example`` a file name inside a folder that
    was passed by mistake, ``hint`` where such a file comes from."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; pass {what} such as {path / example}")
    if not path.exists():
        raise ValueError(f"{option} {path}: no such file; pass {what}{'; ' + hint if hint else ''}")
    return path


def output_file(path, option: str, example: str, make: bool = True) -> Path:
    """``path`` as a file that can be written: not a folder, under folders that exist or can be made (made now
    unless ``make`` is false, so that a check before long work leaves nothing behind)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; pass a file path such as {path / example}")
    output_folder(path.parent, option, make=make, named=path)
    return path


def output_folder(folder, option: str, make: bool = True, named=None) -> Path:
    """``folder`` as a folder to write into: it, and each folder above it, is a folder or does not exist yet."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {named or folder}: {p} is a file, not a folder; choose another path")
    if make:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
