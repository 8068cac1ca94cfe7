"""atomic_write (minirwkv/io/atomic.py): a failed write keeps what the user had, the rename is made durable, and
remove_orphan_temps removes only the temporary files of killed writers."""
import os
import subprocess
import sys

import pytest

from minirwkv.io import atomic
from minirwkv.io.atomic import TEMP_PATTERN, atomic_write, remove_orphan_temps, temp_name


def dead_pid() -> int:
    """The pid of a process that has exited (a child, waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_replaces_the_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failed_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    """The disk fills up when the data is flushed to it: the old file stays, the temporary goes."""
    path = tmp_path / "a.txt"
    path.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        with atomic_write(path, "w") as f:
            f.write("new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The rename is durable only once the folder's entry is on disk: the folder is opened and fsynced, after
    os.replace."""
    events = []
    opened = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", opened.get(fd, "file")))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "open", spy_open)
    monkeypatch.setattr(atomic.os, "fsync", spy_fsync)
    monkeypatch.setattr(atomic.os, "replace", spy_replace)
    path = tmp_path / "a.bin"
    with atomic_write(path) as f:
        f.write(b"x")
    folder = os.path.dirname(os.path.abspath(path))
    assert ("fsync", folder) in events, events
    assert events.index(("fsync", folder)) > events.index(("replace", str(path)))


def test_temp_name_matches_the_pattern():
    name = temp_name("last.ckpt", pid=1234)
    match = TEMP_PATTERN.match(name)
    assert match and match["name"] == "last.ckpt" and match["pid"] == "1234"
    assert temp_name("last.ckpt") != temp_name("last.ckpt")  # two writers in one process never collide


def test_remove_orphan_temps_only_removes_dead_writers_files(tmp_path):
    dead = dead_pid()
    orphan = tmp_path / temp_name("last.ckpt", pid=dead)
    live_other = tmp_path / temp_name("last.ckpt", pid=os.getppid())  # a live process (our parent)
    live_mine = tmp_path / temp_name("best.ckpt")  # a write in progress in this process
    foreign = [tmp_path / n for n in (".last.ckpt.tmp", f"last.ckpt.{dead}.0badcafe.tmp",  # no leading dot
                                      f".last.ckpt.{dead}.xyz12345.tmp", "notes.txt", "last.ckpt")]
    for p in [orphan, live_other, live_mine, *foreign]:
        p.write_bytes(b"data")
    folder_like = tmp_path / temp_name("dir", pid=dead)
    folder_like.mkdir()  # a folder with the pattern's name is not a file atomic_write made
    assert remove_orphan_temps(tmp_path) == [orphan]
    assert not orphan.exists()
    assert all(p.exists() for p in [live_other, live_mine, *foreign, folder_like])


def test_remove_orphan_temps_of_a_missing_folder(tmp_path):
    assert remove_orphan_temps(tmp_path / "nothing") == []


def test_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_write(tmp_path / "a", "a"):
            pass
