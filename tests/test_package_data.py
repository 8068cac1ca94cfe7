"""The CUDA sources ship in the wheel, and an installed package finds them through importlib.resources.

pyproject.toml maps the top-level kernels/ folder to the package ``minirwkv.kernels``; the cupy and cuda-shim
backends read wkv4.cu (and the shim's files) from there. A checkout would pass even if the mapping were wrong, so
this test builds a real wheel from a copy of the sources, unpacks it as an installation, and reads the kernel back.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("wkv4.cu", "cuda_shim.h", "cuda_shim.cpp")  # what the backends read from minirwkv.kernels


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built without network access from a copy of the sources (the build leaves no trace in the repo)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("minirwkv", "kernels", "bench"):  # every folder pyproject maps into the package
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "No module named pip" in result.stderr:
        pytest.skip("pip is not available in this environment to build the wheel")
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    (path,) = out.glob("minirwkv-*.whl")
    return path


def test_kernel_sources_are_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in SHIPPED:
            member = f"minirwkv/kernels/{name}"
            assert member in names, f"{member} is missing from the wheel; see [tool.setuptools.package-data]"
            assert z.read(member) == (ROOT / "kernels" / name).read_bytes(), f"{member} differs from kernels/{name}"
        for package in ("minirwkv/layers", "minirwkv/rwkv4", "minirwkv/engine", "minirwkv/io", "minirwkv/tokenizers",
                        "minirwkv/tools", "minirwkv/backends/numba", "minirwkv/backends/cuda", "minirwkv/bench"):
            assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel; see [tool.setuptools]"


def test_installed_package_reads_the_kernel(wheel, tmp_path):
    """Unpacked, a wheel is an installation: importlib.resources must find wkv4.cu inside it."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from importlib.resources import files\n"
        "import minirwkv.kernels\n"
        "assert minirwkv.kernels.__file__.startswith(sys.argv[1]), minirwkv.kernels.__file__\n"
        "sys.stdout.write(files('minirwkv.kernels').joinpath('wkv4.cu').read_text())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "kernels" / "wkv4.cu").read_text()
