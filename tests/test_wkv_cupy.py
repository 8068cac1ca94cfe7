"""kernels/wkv4.cu on the GPU (the cupy backend) equals the NumPy reference: the checks of test_wkv_cuda_shim.py.

Runs only where CuPy is installed and a CUDA device is present. The shim tests run the same source on every
machine; what only this file can catch is what the shim cannot (docs/kernels.md): races, and NVRTC/driver issues.
"""
import numpy as np
import pytest
from hypothesis import example, given

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install minirwkv[gpu]); the GPU kernels are "
                                          "checked on the CPU by tests/test_wkv_cuda_shim.py")

from minirwkv.backends import get_backend  # noqa: E402
from minirwkv.testing import wkv_inputs  # noqa: E402
from test_wkv_cuda_shim import (DTYPES, ODD_C, T1, check_float32_vs_float64, check_same_as_reference,  # noqa: E402
                                check_state_carried, moderate_inputs, with_examples)


def _device_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver: CUDARuntimeError
        return 0


pytestmark = pytest.mark.skipif(_device_count() == 0, reason="CuPy is installed but no CUDA device is available")


@pytest.fixture(scope="module")
def gpu():
    return get_backend("cupy")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_equals_reference(gpu, dtype):
    @given(x=wkv_inputs(dtype))
    @with_examples
    def check(x):
        check_same_as_reference(gpu, cupy, x, dtype)

    check()


def test_cupy_float32_close_to_float64(gpu):
    @given(x=moderate_inputs())
    @example(x=T1)
    @example(x=ODD_C)
    def check(x):
        check_float32_vs_float64(gpu, cupy, x)

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_state_carried_across_halves(gpu, dtype):
    @given(x=wkv_inputs(dtype))
    @with_examples
    def check(x):
        check_state_carried(gpu, cupy, x, dtype)

    check()


def test_cupy_rejects_numpy_arrays(gpu):
    x = T1
    with pytest.raises(ValueError, match="CuPy arrays"):
        gpu.forward(x.w, x.time_first, x.k, x.v)


def test_cupy_long_sequence_no_t_max():
    """T = 5000: longer than any T_MAX the official kernel is usually built with; one build serves every T."""
    from minirwkv.testing import make_wkv_inputs

    check_same_as_reference(get_backend("cupy"), cupy, make_wkv_inputs(2, 5000, 40, seed=9, k_scale=1.0),
                            np.float64)
