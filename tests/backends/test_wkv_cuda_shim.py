"""What is specific to the cuda-shim backend (kernels/wkv4.cu compiled for the CPU); the properties every kernel
shares are in test_wkv_kernels.py."""
import shutil

import numpy as np
import pytest

from minirwkv.backends import get_wkv
from minirwkv.testing import make_wkv_inputs

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="the cuda-shim backend compiles kernels/wkv4.cu with a host C++ compiler, and none is on PATH")


@pytest.fixture(scope="module")
def shim():
    return get_wkv("4", "cuda-shim")


def test_shim_rejects_mixed_dtypes(shim):
    x = make_wkv_inputs(1, 3, 4)
    with pytest.raises(ValueError, match="one dtype"):
        shim.forward(x.w, x.time_first, x.k.astype(np.float32), x.v.astype(np.float32))
