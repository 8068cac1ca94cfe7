"""kernels/wkv6.cu (the RWKV-5/6 matrix WKV) against the NumPy recurrent reference of minirwkv/rwkv6/wkv.py.

On the CPU through the host-compiler shim (shim_wkv6): y, the final state and all six gradients equal the
reference in the same dtype, over hypothesis draws of shapes, decays, optional state and dstate; the caller's
arrays are untouched. With nvcc: the source compiles to PTX without warnings and without local memory (no T_MAX
arrays). With CuPy and a GPU: the same comparison on the device.
"""
import shutil
import subprocess
from importlib.resources import files

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minirwkv.backends.cuda import shim_wkv6
from minirwkv.backends.cuda.shim_wkv4 import find_compiler
from minirwkv.rwkv6 import wkv
from minirwkv.testing import assert_close

DTYPES = [np.float64, np.float32]
GRAD_NAMES = wkv.WKV6Grads._fields  # dr, dk, dv, dw, du, dstate
W_RANGE = (-12.0, 6.0)  # the raw decay w: decay factors exp(-exp(w)) from ~1 - 6e-6 to exactly 0 (underflow)
MAX_EXAMPLES = 12  # each example runs the NumPy reference in Python loops; the kernel itself is fast


def _has_compiler():
    try:
        find_compiler()
        return True
    except RuntimeError:
        return False


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="the wkv6 shim compiles kernels/wkv6.cu with a "
                                                                "host C++ compiler, and none is on PATH (set CXX)")


@pytest.fixture(scope="module")
def lib():
    return shim_wkv6.load_library()  # compiled once per module (and cached on disk across runs)


def make_inputs(B, T, H, N, seed=0, with_state=True, with_dstate=True, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = dict(r=rng.normal(0, 1, (B, T, H, N)), k=rng.normal(0, 1, (B, T, H, N)), v=rng.normal(0, 1, (B, T, H, N)),
             w=rng.uniform(*W_RANGE, (B, T, H, N)), u=rng.normal(0, 1, (H, N)),
             state=rng.normal(0, 1, (B, H, N, N)) if with_state else None,
             dy=rng.normal(0, 1, (B, T, H, N)),
             dstate=rng.normal(0, 1, (B, H, N, N)) if with_dstate else None)
    return {name: None if a is None else a.astype(dtype) for name, a in x.items()}


@st.composite
def shapes(draw):
    return dict(B=draw(st.integers(1, 2)), T=draw(st.integers(1, 20)), H=draw(st.integers(1, 2)),
                N=draw(st.sampled_from([1, 2, 4, 8])), seed=draw(st.integers(0, 2**32 - 1)),
                with_state=draw(st.booleans()), with_dstate=draw(st.booleans()))


def run(fwd, bwd, x):
    args = (x["r"], x["k"], x["v"], x["w"], x["u"])
    y, s = fwd(*args, state=x["state"])
    return y, s, bwd(*args, x["dy"], state=x["state"], dstate=x["dstate"])


def assert_same_run(a, b, dtype, what=""):
    (y_a, s_a, g_a), (y_b, s_b, g_b) = a, b
    assert y_a.dtype == s_a.dtype == dtype
    assert_close(y_a, y_b, dtype, "same", f"{what} y")
    assert_close(s_a, s_b, dtype, "same", f"{what} state")
    for name, ga, gb in zip(GRAD_NAMES, g_a, g_b):
        assert ga.dtype == dtype, name
        assert_close(ga, gb, dtype, "same", f"{what} {name}")


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_shim_equals_the_recurrent_reference(lib, dtype):
    fwd = lambda *a, **kw: shim_wkv6.forward(*a, **kw, lib=lib)  # noqa: E731
    bwd = lambda *a, **kw: shim_wkv6.backward(*a, **kw, lib=lib)  # noqa: E731

    @settings(max_examples=MAX_EXAMPLES)
    @given(shape=shapes())
    @example(shape=dict(B=2, T=1, H=2, N=4, seed=1, with_state=True, with_dstate=True))
    @example(shape=dict(B=1, T=20, H=1, N=8, seed=2, with_state=False, with_dstate=False))
    def check(shape):
        x = make_inputs(**shape, dtype=dtype)
        before = {n: None if a is None else a.copy() for n, a in x.items()}
        assert_same_run(run(fwd, bwd, x), run(wkv.wkv6_recurrent_forward, wkv.wkv6_recurrent_backward, x),
                        dtype, what=str(shape))
        for n, a in x.items():  # the shim works on copies, never on the caller's arrays
            if a is not None:
                np.testing.assert_array_equal(a, before[n], err_msg=n)

    check()


@needs_compiler
def test_shim_rejects_bad_arguments(lib):
    x = make_inputs(1, 3, 1, 2)
    args = (x["r"], x["k"], x["v"], x["w"], x["u"])
    with pytest.raises(ValueError, match="one dtype"):
        shim_wkv6.forward(x["r"], x["k"].astype(np.float32), *args[2:], lib=lib)
    with pytest.raises(ValueError, match="u has shape"):
        shim_wkv6.forward(*args[:4], x["u"][:, :1], lib=lib)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="overflows"):
        shim_wkv6.forward(*args[:3], np.full_like(x["w"], 1000.0), x["u"], lib=lib)


# ---------------------------------------------------------------------------------------------------------------
# nvcc: the same source compiles for the GPU (no GPU needed)
# ---------------------------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc")
KERNELS = ("wkv6_forward", "wkv6_backward_rows", "wkv6_backward_cols", "wkv6_sum_batch")
INSTANTIATE = """\
#include "wkv6.cu"
template <typename F>
void *wkv6_kernels[] = {(void *)&wkv6_forward<F>, (void *)&wkv6_backward_rows<F>, (void *)&wkv6_backward_cols<F>,
                        (void *)&wkv6_sum_batch<F>};
template void *wkv6_kernels<float>[];
template void *wkv6_kernels<double>[];
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH; no GPU is needed")
def test_wkv6_compiles_to_ptx_without_warnings(tmp_path):
    arch = "sm_90"
    (tmp_path / "wkv6.cu").write_text(files("minirwkv.kernels").joinpath("wkv6.cu").read_text())
    (tmp_path / "instantiate.cu").write_text(INSTANTIATE)
    ptx = tmp_path / f"wkv6_{arch}.ptx"
    cmd = [NVCC, "--ptx", f"-arch={arch}", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
           "-o", str(ptx), str(tmp_path / "instantiate.cu")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    text = ptx.read_text()
    entries = [line for line in text.splitlines() if ".entry" in line]
    for kernel in KERNELS:
        for ftype in ("IfE", "IdE"):  # the mangled template argument: float, double
            assert any(kernel in line and ftype in line for line in entries), f"{kernel}<{ftype}> missing from PTX"
    assert ".local" not in text, "a kernel uses local memory (a per-thread array, as with T_MAX): the design has none"


# ---------------------------------------------------------------------------------------------------------------
# CuPy on a GPU
# ---------------------------------------------------------------------------------------------------------------

def test_cupy_equals_the_recurrent_reference():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed; kernels/wkv6.cu is checked on the CPU by the "
                                              "shim tests above")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver: CUDARuntimeError
        count = 0
    if count == 0:
        pytest.skip("CuPy is installed but no CUDA device is available")
    from minirwkv.backends.cuda import cupy_wkv6

    for dtype in DTYPES:
        for shape in (dict(B=2, T=9, H=2, N=8, seed=5), dict(B=1, T=1, H=1, N=1, seed=6, with_dstate=False)):
            x = make_inputs(**shape, dtype=dtype)
            xg = {n: None if a is None else cupy.asarray(a) for n, a in x.items()}
            y, s, g = run(cupy_wkv6.forward, cupy_wkv6.backward, xg)
            got = (cupy.asnumpy(y), cupy.asnumpy(s), wkv.WKV6Grads(*(cupy.asnumpy(a) for a in g)))
            assert_same_run(got, run(wkv.wkv6_recurrent_forward, wkv.wkv6_recurrent_backward, x), dtype, str(shape))
