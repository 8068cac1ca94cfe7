// The matrix-valued WKV of RWKV-6 (and RWKV-5.2) as CUDA kernels: forward (with carried state) and backward.
//
// A direct transcription of wkv6_recurrent_forward / wkv6_recurrent_backward in minirwkv/rwkv6/wkv.py, with the
// same variable names (decay, lam, bonus, vdy, S_prev, G, Ghat). The math: that module's docstrings and
// docs/rwkv6.md §2 (forward), §5 (the adjoint recurrence). Per (b, h), S[i, j] (row i = key, column j = value):
//
//     y_t = S_{t-1}^T r_t + <r_t, u * k_t> v_t,        S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t v_t^T
//
// Version ladder
//   v1  this file. Barrier-free: no __syncthreads, no shared memory, no warp shuffles, so that the CPU shim
//       (kernels/cuda_shim.h, which runs a grid's threads one after another) executes exactly what a GPU does.
//       One block per (b, h), N threads; every thread reads the whole r_t, k_t, w_t it needs straight from global
//       memory (broadcast reads, served by L1/L2). The state lives in caller-allocated global buffers, not in
//       per-thread arrays: N is a runtime value and there is no T_MAX; T is an ordinary argument.
//   (candidates: v2 keeps S[:, j] in registers for a compile-time N and stages r_t, k_t, w_t in shared memory
//   behind __syncthreads, as the official wkv6_cuda.cu does; v3 checkpoints the backward's row states every
//   C tokens instead of storing all T of them. Both need a GPU to check: kernels/gpu_check.py.)
//
// Layouts: r, k, v, w, y, dy and their gradients (B, T, H, N), element (b, t, h, n) at ((b*T + t)*H + h)*N + n;
// u (H, N); states (B, H, N, N), element (b, h, i, j) at ((b*H + h)*N + i)*N + j; the backward's scratch S_prev
// (B, H, T, N, N), element (b, h, t, i, j) at (((b*H + h)*T + t)*N + i)*N + j.
//
// Float type: one template for float and double; exp is the accurate overload (no --use_fast_math).
// Under nvcc or NVRTC this file needs no #include; for a host C++ compiler, kernels/cuda_shim.h defines
// __global__, threadIdx, ... (minirwkv/backends/cuda/shim_wkv6.py builds it that way).

// Forward. Block bh = b*H + h, thread j owns column j of the state. S (B, H, N, N) holds the initial state on
// entry and the state after the last token on exit (the caller passes a copy, or zeros); column j of block bh is
// read and written by thread j of block bh only.
template <typename F>
__global__ void wkv6_forward(const int B, const int T, const int H, const int N,
                             const F *__restrict__ r, const F *__restrict__ k, const F *__restrict__ v,
                             const F *__restrict__ w, const F *__restrict__ u, F *__restrict__ y,
                             F *__restrict__ S) {
    const int bh = blockIdx.x;
    const int j = threadIdx.x;
    if (bh >= B * H || j >= N) return;
    const int b = bh / H;
    const int h = bh % H;
    F *Sbh = S + (long long)bh * N * N;  // this (b, h)'s state; long long: B*H*N*N may exceed 2^31
    const F *uh = u + (long long)h * N;
    for (int t = 0; t < T; t++) {
        const long long base = ((long long)b * T + t) * H * N + (long long)h * N;  // element (b, t, h, 0)
        const F *rt = r + base;
        const F *kt = k + base;
        const F *wt = w + base;
        const F vj = v[base + j];
        F bonus = 0;  // <r_t, u * k_t>, recomputed by every thread (no exchange between threads)
        F acc = 0;    // (S_{t-1}^T r_t)[j]
        for (int i = 0; i < N; i++) {
            bonus += rt[i] * uh[i] * kt[i];
            acc += rt[i] * Sbh[(long long)i * N + j];
        }
        y[base + j] = acc + bonus * vj;
        for (int i = 0; i < N; i++) {
            const F decay = exp(-exp(wt[i]));  // in (0, 1); exactly 0 once it underflows, the right limit
            F *s = Sbh + (long long)i * N + j;
            *s = decay * *s + kt[i] * vj;
        }
    }
}

// Backward, kernel A: block bh, thread i owns ROW i. Steps the forward row S[i, :] and stores every S_{t-1}[i, :]
// in S_prev (B, H, T, N, N) (v1: all T row-states, T*N*N values per (b, h); checkpoints are a later version), then
// sweeps t = T-1..0 with the adjoint row G[i, :] = dL/dS_t[i, :]. G (B, H, N, N) holds dstate on entry (zeros if
// none) and dL/dS_{-1} on exit. Writes dr, dk, dw (B, T, H, N) at index i and the partial du_bh (B, H, N) of
// this (b, h, i), summed over t; wkv6_sum_batch sums it over b.
//     dr_t[i]   = sum_j S_{t-1}[i, j] dy_t[j] + u[i] k_t[i] vdy_t,   vdy_t = <v_t, dy_t>
//     Ghat[i,j] = G_t[i, j] + u[i] r_t[i] dy_t[j],                 dk_t[i] = sum_j Ghat[i, j] v_t[j]
//     du[i]    += r_t[i] k_t[i] vdy_t
//     dw_t[i]   = lam_t[i] decay_t[i] sum_j G_t[i, j] S_{t-1}[i, j]   (lam = -exp(w), decay = exp(lam))
//     G_{t-1}[i, j] = r_t[i] dy_t[j] + decay_t[i] G_t[i, j]
template <typename F>
__global__ void wkv6_backward_rows(const int B, const int T, const int H, const int N,
                                   const F *__restrict__ r, const F *__restrict__ k, const F *__restrict__ v,
                                   const F *__restrict__ w, const F *__restrict__ u, const F *__restrict__ dy,
                                   const F *__restrict__ state, F *__restrict__ S_prev, F *__restrict__ G,
                                   F *__restrict__ dr, F *__restrict__ dk, F *__restrict__ dw,
                                   F *__restrict__ du_bh) {
    const int bh = blockIdx.x;
    const int i = threadIdx.x;
    if (bh >= B * H || i >= N) return;
    const int b = bh / H;
    const int h = bh % H;
    const long long NN = (long long)N * N;
    const F *S0 = state + bh * NN + (long long)i * N;  // row i of S_{-1}
    F *Sp = S_prev + (long long)bh * T * NN + (long long)i * N;   // row i of S_{t-1} at Sp + t*NN
    F *Gi = G + bh * NN + (long long)i * N;            // row i of the adjoint
    const F ui = u[(long long)h * N + i];

    // Forward sweep: S_prev[t][i, :] = S_{t-1}[i, :].
    if (T > 0)  // T = 0: S_prev is empty, nothing to store
        for (int jj = 0; jj < N; jj++) Sp[jj] = S0[jj];
    for (int t = 0; t + 1 < T; t++) {
        const long long base = ((long long)b * T + t) * H * N + (long long)h * N;
        const F decay = exp(-exp(w[base + i]));
        const F ki = k[base + i];
        const F *cur = Sp + t * NN;
        F *next = Sp + (t + 1) * NN;
        for (int jj = 0; jj < N; jj++) next[jj] = decay * cur[jj] + ki * v[base + jj];
    }

    // Backward sweep.
    F du = 0;
    for (int t = T - 1; t >= 0; t--) {
        const long long base = ((long long)b * T + t) * H * N + (long long)h * N;
        const F *vt = v + base;
        const F *dyt = dy + base;
        const F *St = Sp + t * NN;
        const F ri = r[base + i];
        const F ki = k[base + i];
        const F lam = -exp(w[base + i]);
        const F decay = exp(lam);
        F vdy = 0, dr_acc = 0, dk_acc = 0, gs = 0;
        for (int jj = 0; jj < N; jj++) {
            vdy += vt[jj] * dyt[jj];
            dr_acc += St[jj] * dyt[jj];
            dk_acc += (Gi[jj] + ui * ri * dyt[jj]) * vt[jj];  // Ghat_t v_t
            gs += Gi[jj] * St[jj];
        }
        dr[base + i] = dr_acc + ui * ki * vdy;
        dk[base + i] = dk_acc;
        du += ri * ki * vdy;
        dw[base + i] = lam * decay * gs;
        for (int jj = 0; jj < N; jj++) Gi[jj] = ri * dyt[jj] + decay * Gi[jj];  // G_{t-1}
    }
    du_bh[(long long)bh * N + i] = du;
}

// Backward, kernel B: block bh, thread j owns COLUMN j of its own copy of the adjoint, Gc (B, H, N, N), which
// holds dstate on entry (zeros if none) and dL/dS_{-1} on exit (the same values kernel A leaves in G: identical
// operations). dv_t[j] = sum_i Ghat[i, j] k_t[i], Ghat[i, j] = G_t[i, j] + u[i] r_t[i] dy_t[j].
template <typename F>
__global__ void wkv6_backward_cols(const int B, const int T, const int H, const int N,
                                   const F *__restrict__ r, const F *__restrict__ k, const F *__restrict__ w,
                                   const F *__restrict__ u, const F *__restrict__ dy, F *__restrict__ Gc,
                                   F *__restrict__ dv) {
    const int bh = blockIdx.x;
    const int j = threadIdx.x;
    if (bh >= B * H || j >= N) return;
    const int b = bh / H;
    const int h = bh % H;
    F *Gbh = Gc + (long long)bh * N * N;
    const F *uh = u + (long long)h * N;
    for (int t = T - 1; t >= 0; t--) {
        const long long base = ((long long)b * T + t) * H * N + (long long)h * N;
        const F *rt = r + base;
        const F *kt = k + base;
        const F *wt = w + base;
        const F dyj = dy[base + j];
        F acc = 0;
        for (int i = 0; i < N; i++) acc += (Gbh[(long long)i * N + j] + uh[i] * rt[i] * dyj) * kt[i];
        dv[base + j] = acc;
        for (int i = 0; i < N; i++) {
            F *g = Gbh + (long long)i * N + j;
            *g = rt[i] * dyj + exp(-exp(wt[i])) * *g;  // G_{t-1}
        }
    }
}

// du (H, N) = sum_b du_bh (B, H, N): one thread per (h, n), in a fixed order, one writer per output.
template <typename F>
__global__ void wkv6_sum_batch(const int B, const int HN, const F *__restrict__ x, F *__restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= HN) return;
    F total = 0;
    for (int b = 0; b < B; b++) total += x[(long long)b * HN + c];
    out[c] = total;
}
