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
