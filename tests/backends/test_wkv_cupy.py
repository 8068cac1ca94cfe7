"""What is specific to the cupy backend (kernels/wkv4.cu on a GPU); the properties every kernel shares, the GPU
included, are in test_wkv_kernels.py. Runs only where CuPy is installed and a CUDA device is present."""
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install minirwkv[gpu]); the GPU kernels are "
                                          "checked on the CPU by the cuda-shim backend in tests/test_wkv_kernels.py")

from minirwkv.backends import get_wkv  # noqa: E402
from minirwkv.testing import make_wkv_inputs  # noqa: E402


def _device_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver: CUDARuntimeError
        return 0


pytestmark = pytest.mark.skipif(_device_count() == 0, reason="CuPy is installed but no CUDA device is available")

T1 = make_wkv_inputs(3, 1, 4, seed=3)


@pytest.fixture(scope="module")
def gpu():
    return get_wkv("4", "cupy")


def test_cupy_rejects_numpy_arrays(gpu):
    x = T1
    with pytest.raises(ValueError, match="CuPy arrays"):
        gpu.forward(x.w, x.time_first, x.k, x.v)
