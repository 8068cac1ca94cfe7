"""kernels/wkv4.cu compiles with nvcc, warnings as errors, for the GPUs the cupy backend targets.

Compiling to PTX needs the CUDA toolkit but no GPU, so this runs wherever nvcc is on PATH. The kernels are
templates: a small translation unit takes the address of each instantiation, which makes nvcc emit all six entry
points (forward, backward, batch sum; float and double), and the test checks that the PTX contains them.
"""
import shutil
import subprocess
from importlib.resources import files

import pytest

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH; no GPU is needed")

INSTANTIATE = """\
#include "wkv4.cu"
template <typename F>
void *wkv_kernels[] = {(void *)&wkv_forward<F>, (void *)&wkv_backward<F>, (void *)&wkv_sum_batch<F>};
template void *wkv_kernels<float>[];
template void *wkv_kernels<double>[];
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_wkv4_compiles_to_ptx_without_warnings(arch, tmp_path):
    (tmp_path / "wkv4.cu").write_text(files("minirwkv.kernels").joinpath("wkv4.cu").read_text())
    (tmp_path / "instantiate.cu").write_text(INSTANTIATE)
    ptx = tmp_path / f"wkv4_{arch}.ptx"
    cmd = [NVCC, "--ptx", f"-arch={arch}", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
           "-o", str(ptx), str(tmp_path / "instantiate.cu")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    text = ptx.read_text()
    for kernel in ("wkv_forward", "wkv_backward", "wkv_sum_batch"):
        for ftype in ("IfE", "IdE"):  # the mangled template argument: float, double
            assert any(kernel in line and ftype in line for line in text.splitlines() if ".entry" in line), \
                f"{kernel}<{'float' if ftype == 'IfE' else 'double'}> is missing from the PTX"
    assert ".local" not in text, "a kernel uses local memory (a per-thread array, as with T_MAX): the design has none"
