// The WKV of RWKV-4 as CUDA kernels: forward (with carried state) and the two-sweep backward.
//
// A direct transcription of wkv_recurrent_forward / wkv_recurrent_backward in minirwkv/wkv.py, with the same
// variable names (aa, bb, pp, ww, q, e1, e2; dA, dB, s, r, pa, qa, rho). The math and its derivation: wkv.py and
// docs/wkv.md; the official kernel it mirrors: BlinkDL/RWKV-LM RWKV-v4neo/cuda/wkv_cuda.cu (docs/rwkv4.md §3).
//
// Version ladder (as in llm.c dev/cuda: each version is checked against the reference, then timed by gpu_check.py)
//   v1  this file. One thread per (b, c) walks t = 0..T-1. Exact exp (no fast-math). The backward keeps s and r
//       in global (B, T, C) buffers; gw, gu per (b, c), summed over the batch by a second launch (no atomics).
//   (no other version yet. Candidates, each to be added here with its figures: v2 keeps s, r in registers for
//   short T; v3 splits T into chunks and combines chunk states with a scan, for more threads than B*C.)
//
// Thread layout: idx = blockIdx.x * blockDim.x + threadIdx.x, b = idx / C, c = idx % C. Element (b, t, c) sits at
// b*T*C + t*C + c, so the 32 threads of a warp read 32 consecutive channels of one time step: one coalesced load.
// There is no divisibility requirement on B or C: threads past B*C return at once.
//
// Memory per step and thread: the forward reads k, v and writes y (3 values); the backward's first sweep reads
// k, v, y, gy and writes s, r (6), its second sweep reads k, v, y, s, r and writes gk, gv (7). The state lives in
// registers: 3 values (aa, bb, pp) forward, 7 (aa, bb, pp, dA, dB, gw, gu) then 3 (pa, qa, rho) backward.
//
// Why no T_MAX: the official backward keeps s and r in per-thread local arrays of a compile-time length Tmax, so
// every context length needs its own build and local memory is reserved for Tmax steps on every resident thread.
// Here they are (B, T, C) buffers that the caller allocates, T is an ordinary argument, and one build serves all T.
// The cost is 2*B*T*C extra global traffic each way; local arrays spill to the same global memory anyway.
//
// Float type: one template for float and double. exp is the accurate overload (expf for float, exp for double),
// also in float32: no --use_fast_math and no __expf. __expf is cheaper but a few ulp less accurate, and the kernel
// is bound by memory and latency, not arithmetic, so the accurate exp costs little and keeps float32 within 1e-5
// of the float64 reference (docs/rwkv4.md §3.6). Every exp argument is <= 0, so nothing overflows.
//
// Under nvcc or NVRTC this file needs no #include. For a host C++ compiler, kernels/cuda_shim.h defines
// __global__, threadIdx, ... and kernels/cuda_shim.cpp includes both (the CPU shim of backends/shim_wkv.py).

#define WKV_MIN_VALUE (-1e38)  // stand-in for log(0) = -inf, as wkv.MIN_VALUE; finite, so (MIN_VALUE + w) stays finite

template <typename F>
__device__ __forceinline__ F wkv_max(const F a, const F b) {
    return a > b ? a : b;
}

// Forward. w, u (C,); k, v, y (B, T, C); aa, bb, pp (B, C) hold the initial state on entry and the state after
// the last token on exit (the caller passes copies, or the zero state aa = bb = 0, pp = MIN_VALUE).
template <typename F>
__global__ void wkv_forward(const int B, const int T, const int C,
                            const F *__restrict__ w, const F *__restrict__ u,
                            const F *__restrict__ k, const F *__restrict__ v, F *__restrict__ y,
                            F *__restrict__ state_aa, F *__restrict__ state_bb, F *__restrict__ state_pp) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;  // the last block may be partly outside: any B and C work
    const int b = idx / C;
    const int c = idx % C;
    const long long offset = (long long)b * T * C + c;  // element (b, 0, c); long long: B*T*C may exceed 2^31

    const F w_c = w[c];
    const F u_c = u[c];
    F aa = state_aa[idx];
    F bb = state_bb[idx];
    F pp = state_pp[idx];
    for (int t = 0; t < T; t++) {
        const long long i = offset + (long long)t * C;
        const F kk = k[i];
        const F vv = v[i];

        F ww = u_c + kk;  // log-weight of the current token in the output
        F q = wkv_max(pp, ww);
        F e1 = exp(pp - q);  // weight of the past, scaled by e^-q
        F e2 = exp(ww - q);  // weight of the current token, scaled by e^-q
        y[i] = (e1 * aa + e2 * vv) / (e1 * bb + e2);  // the denominator is >= 1 once a token was seen

        ww = pp + w_c;  // the past decays once
        q = wkv_max(ww, kk);
        e1 = exp(ww - q);
        e2 = exp(kk - q);
        aa = e1 * aa + e2 * vv;
        bb = e1 * bb + e2;
        pp = q;
    }
    state_aa[idx] = aa;
    state_bb[idx] = bb;
    state_pp[idx] = pp;
}

// Backward from the zero initial state. Inputs w, u (C,); k, v, y (saved by the forward), gy (B, T, C).
// Scratch s, r (B, T, C): written by sweep 1, read by sweep 2. Outputs gk, gv (B, T, C) and the per-(b, c)
// partials gw, gu (B, C), assigned (not accumulated), to be summed over b by wkv_sum_batch.
template <typename F>
__global__ void wkv_backward(const int B, const int T, const int C,
                             const F *__restrict__ w, const F *__restrict__ u,
                             const F *__restrict__ k, const F *__restrict__ v, const F *__restrict__ y,
                             const F *__restrict__ gy, F *__restrict__ s, F *__restrict__ r,
                             F *__restrict__ gw_bc, F *__restrict__ gu_bc, F *__restrict__ gk, F *__restrict__ gv) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int b = idx / C;
    const int c = idx % C;
    const long long offset = (long long)b * T * C + c;

    const F w_c = w[c];
    const F u_c = u[c];

    // Sweep 1, forward in time: recompute the state, accumulate gw and gu, store s_t = g_t e^{q_t} / D_t and
    // r_t = u + k_t - q_t (<= 0) for sweep 2.
    F aa = 0, bb = 0, pp = WKV_MIN_VALUE;
    F dA = 0;  // A'_t = da_t/dw, scaled by e^-pp
    F dB = 0;  // B'_t = db_t/dw, scaled by e^-pp
    F gw = 0, gu = 0;
    for (int t = 0; t < T; t++) {
        const long long i = offset + (long long)t * C;
        const F kk = k[i];
        const F vv = v[i];
        const F yy = y[i];

        F ww = u_c + kk;
        F q = wkv_max(pp, ww);
        F e1 = exp(pp - q);
        F e2 = exp(ww - q);
        const F ss = gy[i] / (e1 * bb + e2);  // g_t / (D_t e^-q); |ss| <= |g_t| as the denominator is >= 1
        s[i] = ss;
        r[i] = ww - q;
        gw += (dA - yy * dB) * e1 * ss;
        gu += (vv - yy) * e2 * ss;

        ww = pp + w_c;
        q = wkv_max(ww, kk);
        e1 = exp(ww - q);
        e2 = exp(kk - q);
        dA = e1 * (aa + dA);  // A'_{t+1} = e^w (A'_t + a_t)
        dB = e1 * (bb + dB);  // B'_{t+1} = e^w (B'_t + b_t)
        aa = e1 * aa + e2 * vv;
        bb = e1 * bb + e2;
        pp = q;
    }
    gw_bc[idx] = gw;
    gu_bc[idx] = gu;

    // Sweep 2, backward in time: P and Q of the tokens after i, kept as (pa, qa) scaled by e^-rho.
    F pa = 0, qa = 0, rho = WKV_MIN_VALUE;
    for (int t = T - 1; t >= 0; t--) {
        const long long i = offset + (long long)t * C;
        const F kk = k[i];
        const F vv = v[i];
        const F yy = y[i];
        const F ss = s[i];
        const F rr = r[i];

        F e1 = ss * exp(rr);  // g_i e^{u+k_i} / D_i
        F e2 = exp(kk + rho);  // e^{k_i} times the scale of P, Q (<= 1: rho <= -k_i)
        gk[i] = e1 * (vv - yy) + e2 * (pa * vv + qa);
        gv[i] = e1 + e2 * pa;

        const F z = rr - u_c - kk;  // -q_i, so g_i / D_i = s_i e^z
        const F ww = rho + w_c;
        const F q = wkv_max(ww, z);
        e1 = exp(ww - q);
        e2 = exp(z - q);
        pa = e1 * pa + ss * e2;
        qa = e1 * qa - ss * e2 * yy;
        rho = q;
    }
}

// The batch reduction of the backward: out[c] = sum_b x[b, c] for x (B, C). One thread per channel, reading the
// partials in a fixed order, so the sum is deterministic and nothing races (each out[c] has one writer).
template <typename F>
__global__ void wkv_sum_batch(const int B, const int C, const F *__restrict__ x, F *__restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    F total = 0;
    for (int b = 0; b < B; b++) total += x[(long long)b * C + c];
    out[c] = total;
}
