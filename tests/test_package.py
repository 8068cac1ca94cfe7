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


def test_no_import_cycles():
    """No module of the package imports, directly or through others, a module that imports it back, counting the
    imports inside functions too (a deferred import is still a dependency): each layer uses only what lies below.
    Package __init__ files, which re-export, are left out."""
    import ast
    from pathlib import Path

    import minirwkv

    root = Path(minirwkv.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        package = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    edges.add(target + "." + alias.name if not node.module else target)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("minirwkv")}
        graph[name] = edges
    graph = {k: {e for e in v if e in graph and e != k} for k, v in graph.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    packages = {k for k in graph if (root.parent / k.replace(".", "/") / "__init__.py").exists()}
    cycles = [c for k in graph if k not in packages and (c := cycle_from(k)) and not set(c) & packages]
    assert cycles == [], f"import cycles: {cycles[:3]}"
