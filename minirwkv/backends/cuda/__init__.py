"""The CUDA C kernels of kernels/ run two ways: cupy_wkvN.py (cupy.RawModule on a GPU) and shim_wkvN.py (the same
source compiled for the CPU by the host C++ compiler with kernels/cuda_shim.h, for tests). docs/kernels.md."""
