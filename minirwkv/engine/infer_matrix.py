r"""RNNRunner's block program for RWKV-5.2 and RWKV-6 (the matrix-state generations): weights prepared once, the
products through the runner's thread pool, the WKV through the Numba kernel that updates the state in place.

The same function as ``rwkv6.rnn.rnn_step_with`` (tests/engine/test_infer.py checks it token by token), arranged for
speed as infer.py arranges RWKV-4: every matrix transposed once to a C-contiguous (in, out) copy, the products of a
layer that share an input handed to the pool as one job, and a block of T tokens per call (T = 1 for a step, up to
the runner's chunk for a prompt). The element-wise work is NumPy on (B·T, X) arrays: at batch 1 on the 169M shape a
token reads 0.6 GB of weights, which dwarfs it (docs/inference.md).

Per layer, one line per operation (B·T rows):

    z = LN_ln1(x);  zz = shift(z, att_x)                                   att_x <- z[:, -1]
    RWKV-5.2:  x_q = z mu_q + zz (1 - mu_q), q = r, k, v, g;  w = time_decay
    RWKV-6:    delta = zz - z;  h = tanh((z + delta maa_x) @ W1);  x_f = z + delta (maa_f + h_f @ W2_f)
               w = time_decay + tanh(x_w @ Wd1) @ Wd2
    r, k, v, a = x_r @ Wr, x_k @ Wk, x_v @ Wv, x_g @ Wg                    (one pool job)
    y = WKV(r, k, v, w, u; S)                                              S updated in place (Numba)
    x += (GroupNorm(y) * SiLU(a)) @ Wo
    z2 = LN_ln2(x);  zz2 = shift(z2, ffn_x);  ffn_x <- z2[:, -1]
    x += sigmoid(x_r' @ Wfr) * (relu(x_k' @ Wfk)^2 @ Wfv)                  x_k', x_r' mixes of z2, zz2
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import layers as ops
from ..rwkv6.model import FFN_MIXES as V6_FFN_MIXES, TARGETS
from ..rwkv5.model import FFN_MIXES as V5_FFN_MIXES


class MatrixLayer(NamedTuple):
    """One block's weights as the runner uses them: vectors (C,) or (A,), matrices (in, out) C-contiguous."""

    ln1: tuple  # (weight, bias) (C,)
    mixes: np.ndarray | None  # RWKV-5.2: (4, C) current-token weights of r, k, v, g; RWKV-6: None
    decay: np.ndarray  # RWKV-5.2: theta (H, N); RWKV-6: time_decay (A,)
    maa_x: np.ndarray | None  # RWKV-6 (C,)
    maa: np.ndarray | None  # RWKV-6 (5, C) time_maa_f for f = w, k, v, r, g
    maa_w1: np.ndarray | None  # RWKV-6 (C, 5 D_mix)
    maa_w2: np.ndarray | None  # RWKV-6 (5, D_mix, C)
    decay_w1: np.ndarray | None  # RWKV-6 (C, D_dec)
    decay_w2: np.ndarray | None  # RWKV-6 (D_dec, A)
    u: np.ndarray  # (H, N) time_faaaa
    att_receptance: np.ndarray  # (C, A)
    att_key: np.ndarray  # (C, A)
    att_value: np.ndarray  # (C, A)
    att_gate: np.ndarray  # (C, A)
    ln_x: tuple  # (weight, bias) (A,)
    att_output: np.ndarray  # (A, C)
    ln2: tuple  # (weight, bias) (C,)
    ffn_mix_k: np.ndarray  # (C,) current-token weight
    ffn_mix_r: np.ndarray  # (C,)
    ffn_key: np.ndarray  # (C, F)
    ffn_receptance: np.ndarray  # (C, C)
    ffn_value: np.ndarray  # (F, C)


def prepare_layer(params: dict, i: int, version: str) -> MatrixLayer:
    p = f"blocks.{i}."

    def vec(name):
        return np.ascontiguousarray(params[p + name].reshape(-1))

    def mat(name):
        return np.ascontiguousarray(params[p + name].T)  # (out, in) -> (in, out)

    def pair(name):
        return vec(name + ".weight"), vec(name + ".bias")

    v6 = version == "6"
    ffn_k, ffn_r = ((V6_FFN_MIXES if v6 else V5_FFN_MIXES).forward(params, p))
    return MatrixLayer(
        ln1=pair("ln1"),
        mixes=None if v6 else np.stack([vec(f"att.time_mix_{m}") for m in "rkvg"]),
        decay=vec("att.time_decay") if v6 else np.ascontiguousarray(params[p + "att.time_decay"]),
        maa_x=vec("att.time_maa_x") if v6 else None,
        maa=np.stack([vec(f"att.time_maa_{f}") for f in TARGETS]) if v6 else None,
        maa_w1=np.ascontiguousarray(params[p + "att.time_maa_w1"]) if v6 else None,
        maa_w2=np.ascontiguousarray(params[p + "att.time_maa_w2"]) if v6 else None,
        decay_w1=np.ascontiguousarray(params[p + "att.time_decay_w1"]) if v6 else None,
        decay_w2=np.ascontiguousarray(params[p + "att.time_decay_w2"]) if v6 else None,
        u=np.ascontiguousarray(params[p + "att.time_faaaa"]),
        att_receptance=mat("att.receptance.weight"), att_key=mat("att.key.weight"),
        att_value=mat("att.value.weight"), att_gate=mat("att.gate.weight"),
        ln_x=pair("att.ln_x"), att_output=mat("att.output.weight"),
        ln2=pair("ln2"), ffn_mix_k=np.ascontiguousarray(ffn_k.reshape(-1)),
        ffn_mix_r=np.ascontiguousarray(ffn_r.reshape(-1)),
        ffn_key=mat("ffn.key.weight"), ffn_receptance=mat("ffn.receptance.weight"),
        ffn_value=mat("ffn.value.weight"))


def _shift(z, prev):
    """zz[:, t] = z[:, t-1], zz[:, 0] = prev (B, C); then prev <- z[:, -1] in place (the state advances)."""
    zz = np.empty_like(z)  # (B, T, C)
    zz[:, 1:] = z[:, :-1]
    zz[:, 0] = prev
    prev[...] = z[:, -1]
    return zz


class MatrixProgram:
    """The per-block computation of RWKV-5.2 / RWKV-6 for ``RNNRunner`` (infer.py owns the tokens, the embedding,
    ln_out and the head; this runs the layers)."""

    def __init__(self, params: dict, config, pool):
        self.config = config
        self.v6 = config.version == "6"
        self.layers = [prepare_layer(params, i, config.version) for i in range(config.n_layer)]
        self.matmuls = pool.matmuls
        from ..backends.numba.wkv6 import _forward_kernel

        self._wkv = _forward_kernel  # (r, k, v, w, u, y, state): y written, state updated in place

    def _product(self, pairs):
        """[(a (M, K), W (K, N)), ...] -> [a @ W, ...], computed as one pool job."""
        outs = [np.empty((a.shape[0], W.shape[1]), a.dtype) for a, W in pairs]
        self.matmuls([(a, W, out) for (a, W), out in zip(pairs, outs)])
        return outs

    def _inputs(self, lw: MatrixLayer, z, zz):
        """(x_r, x_k, x_v, x_g) (M, C) each and the raw decay w (M, H, N), M = B·T rows."""
        H, N = self.config.n_head, self.config.head_size
        M = z.shape[0]
        if not self.v6:
            xs = [z * mu + zz * (1 - mu) for mu in lw.mixes]  # r, k, v, g
            return xs, np.broadcast_to(lw.decay, (M, H, N))
        delta = zz - z  # (M, C)
        D = lw.maa_w2.shape[1]
        (h,) = self._product([(z + delta * lw.maa_x, lw.maa_w1)])  # (M, 5 D)
        np.tanh(h, out=h)
        ms = self._product([(np.ascontiguousarray(h[:, f * D:(f + 1) * D]), lw.maa_w2[f]) for f in range(5)])
        x = {f: z + delta * (lw.maa[i] + ms[i]) for i, f in enumerate(TARGETS)}  # (M, C) each
        (q,) = self._product([(x["w"], lw.decay_w1)])  # (M, D_dec)
        np.tanh(q, out=q)
        (w,) = self._product([(q, lw.decay_w2)])  # (M, A)
        w += lw.decay
        return [x["r"], x["k"], x["v"], x["g"]], w.reshape(M, H, N)

    def run(self, x, layers):
        """x (B, T, C) the embedded tokens, advanced through every layer in place; ``layers`` the LayerStates
        (att_x, wkv, ffn_x), updated in place."""
        B, T, C = x.shape
        H, N = self.config.n_head, self.config.head_size
        M = B * T
        xm = x.reshape(M, C)
        for lw, s in zip(self.layers, layers):
            z = ops.layernorm_forward(x, *lw.ln1)[0]  # (B, T, C)
            zz = _shift(z, s.att_x)  # (B, T, C)
            xs, w = self._inputs(lw, z.reshape(M, C), zz.reshape(M, C))
            r, k, v, a = self._product([(xs[0], lw.att_receptance), (xs[1], lw.att_key), (xs[2], lw.att_value),
                                        (xs[3], lw.att_gate)])  # (M, A) each
            heads = (B, T, H, N)
            y = np.empty(heads, x.dtype)  # (B, T, H, N)
            self._wkv(r.reshape(heads), k.reshape(heads), v.reshape(heads),
                      np.ascontiguousarray(np.broadcast_to(w.reshape(heads), heads)), lw.u, y, s.wkv)
            o = ops.groupnorm_forward(y.reshape(M, -1), *lw.ln_x, H, self.config.ln_x_eps)[0]  # (M, A)
            o *= ops.silu_forward(a)[0]
            (att,) = self._product([(o, lw.att_output)])  # (M, C)
            xm += att
            z2 = ops.layernorm_forward(x, *lw.ln2)[0]  # (B, T, C)
            zz2 = _shift(z2, s.ffn_x)
            z2m, zz2m = z2.reshape(M, C), zz2.reshape(M, C)
            fk, fr = self._product([(z2m * lw.ffn_mix_k + zz2m * (1 - lw.ffn_mix_k), lw.ffn_key),
                                    (z2m * lw.ffn_mix_r + zz2m * (1 - lw.ffn_mix_r), lw.ffn_receptance)])
            np.maximum(fk, 0, out=fk)
            fk *= fk  # relu^2
            (fv,) = self._product([(fk, lw.ffn_value)])  # (M, C)
            xm += ops.sigmoid(fr) * fv
        return x
