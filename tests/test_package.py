"""Importing minirwkv does no work: no Numba, no CuPy, no compiled kernel, no environment read at import."""
import subprocess
import sys


def test_import_compiles_nothing_and_imports_no_heavy_module():
    code = ("import sys, minirwkv; "
            "heavy = [m for m in ('numba', 'cupy', 'torch', 'mpi4py', 'matplotlib', 'tiktoken') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing minirwkv imported {out}"


def test_public_api():
    import minirwkv

    for name in ("ModelConfig", "init_params", "config_from_params", "forward", "loss_and_grads", "init_state",
                 "rnn_step", "prefill", "load_params"):
        assert callable(getattr(minirwkv, name)), name


def test_process_settings_are_applied_by_the_command_not_the_library():
    code = ("import minirwkv, numba; before = numba.config.THREADING_LAYER; "
            "from minirwkv.engine.process import tune_for_training; tune_for_training(); "
            "print(before, numba.config.THREADING_LAYER)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    before, after = out.split()
    assert before == "default" and after == "workqueue"


def test_keep_freed_memory_takes_on_glibc():
    import platform

    from minirwkv.engine.process import keep_freed_memory

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected


def test_atomic_write_replaces_only_when_complete(tmp_path):
    import pytest

    from minirwkv.io.atomic import atomic_write

    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with atomic_write(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
