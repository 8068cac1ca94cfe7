// A CPU stand-in for the parts of CUDA that kernels/wkv4.cu uses, so a host C++ compiler can build the SAME source.
//
// A kernel is an ordinary function that reads its position from the globals threadIdx, blockIdx, blockDim and
// gridDim; shim_launch (below) sets them and calls the function once per thread, one thread after another.
// What this runs faithfully: the arithmetic, the indexing and the bounds checks of one thread. What it cannot show:
// anything that depends on threads running at the same time (races, __syncthreads, shared memory, warp shuffles).
// Those need a GPU: kernels/gpu_check.py.
#pragma once

#include <cmath>

#define __global__
#define __device__
#define __forceinline__ inline
// __restrict__ is understood by g++ and clang++ as it is.

// The float and double exp of the device math library. std::exp(float) is the accurate single-precision exp,
// like CUDA's exp(float) overload (and unlike --use_fast_math's __expf).
using std::exp;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// thread_local: two Python threads may launch at once (ctypes releases the GIL); each gets its own position.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// kernel<<<grid, block>>>(args...) for 1-D launches, thread by thread.
template <typename Kernel, typename... Args>
void shim_launch(const unsigned int grid, const unsigned int block, Kernel kernel, Args... args) {
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    for (unsigned int bx = 0; bx < grid; bx++) {
        blockIdx = dim3{bx, 0, 0};
        for (unsigned int tx = 0; tx < block; tx++) {
            threadIdx = dim3{tx, 0, 0};
            kernel(args...);
        }
    }
}
