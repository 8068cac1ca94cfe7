// The CPU shim's entry points: kernels/wkv4.cu compiled by the host C++ compiler, exported as C functions for
// ctypes (minirwkv/backends/shim_wkv.py). One macro line per float type instantiates the templates; the kernels
// themselves are written once, in wkv4.cu.
#include "cuda_shim.h"
#include "wkv4.cu"

static unsigned int blocks_for(const int n, const int block) {
    return (unsigned int)((n + block - 1) / block);  // round up: the last block may be partly outside
}

// Same launch layout as minirwkv/backends/cupy_wkv.py: B*C threads in blocks of `block` for the WKV, C threads
// for the batch sum. gw_bc, gu_bc (B, C) are scratch for the per-(b, c) partials; gw, gu (C,) get their sum.
#define MINIRWKV_SHIM_EXPORT(F, SUFFIX)                                                                      \
    extern "C" void wkv_forward_##SUFFIX(int B, int T, int C, const F *w, const F *u, const F *k, const F *v, \
                                         F *y, F *aa, F *bb, F *pp, int block) {                              \
        shim_launch(blocks_for(B * C, block), block, wkv_forward<F>, B, T, C, w, u, k, v, y, aa, bb, pp);     \
    }                                                                                                         \
    extern "C" void wkv_backward_##SUFFIX(int B, int T, int C, const F *w, const F *u, const F *k, const F *v,\
                                          const F *y, const F *gy, F *s, F *r, F *gw_bc, F *gu_bc,            \
                                          F *gw, F *gu, F *gk, F *gv, int block) {                            \
        shim_launch(blocks_for(B * C, block), block, wkv_backward<F>, B, T, C, w, u, k, v, y, gy, s, r,       \
                    gw_bc, gu_bc, gk, gv);                                                                    \
        shim_launch(blocks_for(C, block), block, wkv_sum_batch<F>, B, C, (const F *)gw_bc, gw);               \
        shim_launch(blocks_for(C, block), block, wkv_sum_batch<F>, B, C, (const F *)gu_bc, gu);               \
    }

MINIRWKV_SHIM_EXPORT(float, f32)
MINIRWKV_SHIM_EXPORT(double, f64)
