r"""Fast RWKV-4 inference on the CPU: weights prepared once, buffers allocated once, B sequences as one batch.

``rnn.rnn_step`` is the readable reference: it re-derives everything from the checkpoint names at every token.
``RNNRunner`` computes the same function (tests check it token by token against ``rnn_step`` and
``minirwkv.prefill``) and spends its time where it must: reading the weights. Per token at batch 1 a model reads
every matrix once (a matrix-vector product cannot reuse a weight), so the speed limit is the memory bandwidth:
bytes of weights / bandwidth. docs/inference.md has the design and the measured figures (``python -m
minirwkv.bench_infer``).

What is prepared once (as the official ``rwkv`` package does at load time):
  * ``emb = LN_ln0(emb.weight)``, the fold of ln0. Exact: a layernorm acts on each row alone, so
    LN(E)[idx] == LN(E[idx]) for every idx, and the same routine (ops.layernorm_forward) computes both.
    It removes one layernorm per token and the ln0 parameters; the embedding row is read, nothing else.
  * ``w = -exp(time_decay)`` per layer, and ``time_mix_*`` squeezed from (1, 1, C) to (C,).
  * Every matrix transposed to a C-contiguous (in, out) copy, so a product is ``x @ W`` over contiguous rows:
    for batch 1 NumPy calls the BLAS matrix-vector routine that streams W row after row.
Memory: the prepared weights are a second copy of the parameters (the runner does not modify ``params``).

Buffers: every activation of a block of up to ``chunk_size`` tokens for B sequences, allocated in __init__. A call
for T tokens uses the first B·T rows of each (contiguous views), so the same code runs one RNN step (T = 1) and a
chunk of a prompt (T up to chunk_size: matrix-matrix products batched over the chunk, the WKV a loop over its
tokens). Prefill memory is bounded by the chunk; only the last token of a block goes through the head (V wide).

The per-block path (``_run``), one line per operation; the element-wise groups are Numba loops
(backends/numba_infer.py), the products NumPy's BLAS:

    x = emb[tokens]
    per layer:  xk, xv, xr = time_mix_inputs(x)                    (LN_ln1, shift, mixes; state att_x)
                k, v, r = xk @ Wk, xv @ Wv, xr @ Wr
                g = wkv_gate(k, v, r)                              (WKV step, sigmoid(r) *; state aa, bb, pp)
                att = g @ Wo
                xk, xr = channel_mix_inputs(x, att)                (x += att, LN_ln2, shift, mixes; state ffn_x)
                k, r = xk @ Wfk, xr @ Wfr;  relu_square(k);  kv = k @ Wfv
                gate_residual(x, r, kv)                            (x += sigmoid(r) * kv)
    logits = LN_ln_out(x[:, -1]) @ head
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import layers as ops
from ..api import check_params, check_state, check_tokens, init_state, model_for
from .infer_matrix import MatrixProgram
from ..state import State
from ..backends.threads import configure, get_pool, resolve_threads
from ..devices import array_module, to_numpy
from ..io.statefile import load_state, save_state  # noqa: F401  (their old import path)

DEFAULT_CHUNK = 256  # tokens per prefill block: activations (B, 256, 4C) stay small; long enough to batch products


class PreparedLayer(NamedTuple):
    """One block's weights as the runner uses them: vectors (C,), matrices (in, out) C-contiguous."""

    ln1_w: np.ndarray
    ln1_b: np.ndarray
    att_mix_k: np.ndarray
    att_mix_v: np.ndarray
    att_mix_r: np.ndarray
    w: np.ndarray  # -exp(time_decay)
    u: np.ndarray  # time_first
    att_key: np.ndarray  # (C, C)
    att_value: np.ndarray  # (C, C)
    att_receptance: np.ndarray  # (C, C)
    att_output: np.ndarray  # (C, C)
    ln2_w: np.ndarray
    ln2_b: np.ndarray
    ffn_mix_k: np.ndarray
    ffn_mix_r: np.ndarray
    ffn_key: np.ndarray  # (C, F)
    ffn_receptance: np.ndarray  # (C, C)
    ffn_value: np.ndarray  # (F, C)


def fold_ln0(params: dict, rows_per_block: int = 4096) -> np.ndarray:
    """LN_ln0 applied to every row of emb.weight (V, C), in blocks of rows so the temporaries stay small."""
    emb = params["emb.weight"]
    out = np.empty_like(emb)  # (V, C)
    weight, bias = params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"]
    for i in range(0, emb.shape[0], rows_per_block):
        out[i:i + rows_per_block] = ops.layernorm_forward(emb[i:i + rows_per_block], weight, bias)[0]
    return out


def prepare_layer(params: dict, i: int) -> PreparedLayer:
    p = f"blocks.{i}."

    def vec(name):
        return np.ascontiguousarray(params[p + name].reshape(-1))  # (C,)

    def mat(name):
        return np.ascontiguousarray(params[p + name].T)  # (out, in) -> (in, out)

    return PreparedLayer(
        vec("ln1.weight"), vec("ln1.bias"), vec("att.time_mix_k"), vec("att.time_mix_v"), vec("att.time_mix_r"),
        -np.exp(params[p + "att.time_decay"]), vec("att.time_first"),
        mat("att.key.weight"), mat("att.value.weight"), mat("att.receptance.weight"), mat("att.output.weight"),
        vec("ln2.weight"), vec("ln2.bias"), vec("ffn.time_mix_k"), vec("ffn.time_mix_r"),
        mat("ffn.key.weight"), mat("ffn.receptance.weight"), mat("ffn.value.weight"))


class _Buffers(NamedTuple):
    """Views of the first B·T rows of every activation buffer, shaped (B, T, X); ``*_m`` are the same memory as
    matrix-product operands (B·T, X), which the runner's thread pool splits into blocks (backends/threads.py)."""

    x: np.ndarray
    z: np.ndarray
    xk: np.ndarray
    xv: np.ndarray
    xr: np.ndarray
    k: np.ndarray
    v: np.ndarray
    r: np.ndarray
    g: np.ndarray
    att: np.ndarray
    fk: np.ndarray  # (B, T, F)
    fr: np.ndarray
    fv: np.ndarray
    xk_m: np.ndarray
    xv_m: np.ndarray
    xr_m: np.ndarray
    k_m: np.ndarray
    v_m: np.ndarray
    r_m: np.ndarray
    g_m: np.ndarray
    att_m: np.ndarray
    fk_m: np.ndarray
    fr_m: np.ndarray
    fv_m: np.ndarray


class _Runner:
    """What both runners share: ``batch_size`` sequences of one model and their State."""

    @property
    def batch_size(self) -> int:
        return self._B

    def _set_batch_size(self, batch_size) -> int:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._B = int(batch_size)
        return self._B

    def reset(self):
        """The zero state for every sequence (rnn.init_state)."""
        self.state = init_state(self.params, self._B)

    def get_state(self) -> State:
        """A copy of the current state (B sequences)."""
        return self.state.copy()

    def _check_step(self, tokens) -> np.ndarray:
        """One token per sequence, as an array: checked at this public edge, not in the per-layer loop."""
        tokens = np.asarray(tokens)
        check_tokens(tokens, self.config.vocab_size, np, name="tokens", ndim=1)
        if tokens.shape[0] != self._B:
            raise ValueError(f"tokens has {tokens.shape[0]} entries, the runner's batch size is {self._B}; "
                             f"use runner.resize(n) to change it")
        return tokens

    def _check_prompts(self, prompts, rows) -> tuple[list[np.ndarray], list[int]]:
        """``prompts`` (a (B, T) array or a list of 1-D arrays) and ``rows`` (default all) checked -> (list of
        1-D token arrays, list of distinct row indices), one row per prompt."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            prompts = list(prompts)
        prompts = [np.asarray(p) for p in prompts]
        rows = list(range(self._B)) if rows is None else [int(r) for r in rows]
        if len(rows) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(rows)} rows: give one prompt per row")
        if any(not 0 <= r < self._B for r in rows) or len(set(rows)) != len(rows):
            raise ValueError(f"rows must be distinct indices in [0, {self._B}), got {rows}")
        for i, p in enumerate(prompts):
            check_tokens(p, self.config.vocab_size, np, name=f"prompts[{i}]", ndim=1)
        return prompts, rows


class RNNRunner(_Runner):
    """RNN mode of any generation (RWKV-4 here; RWKV-5.2 / RWKV-6 through infer_matrix.py) for ``batch_size``
    sequences at once, on the CPU (NumPy arrays, float32 or float64).

        runner = RNNRunner(params, batch_size=2)
        logits = runner.prefill([prompt_ids_0, prompt_ids_1])   # (B, V): next-token logits after each prompt
        logits = runner.step(tokens)                            # tokens (B,) -> (B, V)
        saved = runner.get_state(); ...; runner.set_state(saved)

    The state lives inside the runner and is updated in place; ``get_state`` returns a copy (a ``minirwkv.State``,
    the type ``rnn_step`` uses), ``set_state`` copies one in. Results equal ``rnn_step`` / ``prefill`` within
    float rounding (tests/test_infer.py).
    """

    def __init__(self, params: dict, batch_size: int = 1, chunk_size: int = DEFAULT_CHUNK, threads: int | None = None):
        config = check_params(params)
        if array_module(params["emb.weight"]) is not np:
            raise ValueError("RNNRunner runs on the CPU: pass NumPy parameters ({k: cupy.asnumpy(v) ...}); on the "
                             "GPU use minirwkv.rnn_step / minirwkv.prefill")
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (tokens per prefill block), got {chunk_size!r}")
        self.params = params  # read by init_state / check_state and by nothing on the per-token path
        self.config = config
        self.dtype = params["emb.weight"].dtype
        self.chunk_size = int(chunk_size)
        self.emb = fold_ln0(params)  # (V, C)
        self.threads = resolve_threads(threads)  # the products split over this many threads (backends/threads.py)
        self._pool = get_pool(self.threads)
        # RWKV-4's layers run here (_run); RWKV-5.2 / RWKV-6 run infer_matrix.MatrixProgram's
        self._matrix = None if config.version == "4" else MatrixProgram(params, config, self._pool)
        self.layers = [prepare_layer(params, i) for i in range(config.n_layer)] if self._matrix is None else []
        self.ln_out_w, self.ln_out_b = params["ln_out.weight"], params["ln_out.bias"]
        self.head = np.ascontiguousarray(params["head.weight"].T)  # (C, V)
        self._kernels = _load_kernels()
        configure(self.threads)
        self._zero, self._one = self.dtype.type(0), self.dtype.type(1)  # the kernels' constants, in their dtype
        self.state = None
        self._allocate(batch_size)

    # --- sizes, buffers, state ----------------------------------------------------------------------------------

    def _allocate(self, batch_size: int):
        B = self._set_batch_size(batch_size)
        N, C, F = B * self.chunk_size, self.config.n_embd, self.config.dim_ffn
        self._flat = {name: np.empty(N * (F if name == "fk" else C), self.dtype)
                      for name in ("x", "z", "xk", "xv", "xr", "k", "v", "r", "g", "att", "fk", "fr", "fv")}
        self._view_cache = {}
        self._z_last = np.empty((B, C), self.dtype)  # (B, C) LN_ln_out of the last token
        self._logits = np.empty((B, self.config.vocab_size), self.dtype)  # (B, V)
        self.reset()

    def resize(self, batch_size: int):
        """Change the batch size (new buffers) and reset the state to zeros."""
        self._allocate(batch_size)

    def set_state(self, state: State):
        """Continue from ``state`` (a State of this model with batch_size rows), copied in."""
        check_state(state, self.params, self._B)
        for mine, theirs in zip(self.state.layers, state.layers):
            for a, b in zip(mine, theirs):
                np.copyto(a, b)

    def _views(self, B: int, T: int) -> _Buffers:
        key = (B, T)
        if key not in self._view_cache:
            C, F = self.config.n_embd, self.config.dim_ffn
            blocks = {name: a[:B * T * (F if name == "fk" else C)].reshape(B, T, -1) for name, a in self._flat.items()}
            mats = {name + "_m": a.reshape(B * T, -1) for name, a in blocks.items() if name not in ("x", "z")}
            self._view_cache[key] = _Buffers(**blocks, **mats)
        return self._view_cache[key]

    # --- running tokens -------------------------------------------------------------------------------------------

    def step(self, tokens) -> np.ndarray:
        """One token per sequence: tokens (B,) int -> logits (B, V) (a new array), the state advanced."""
        tokens = self._check_step(tokens)
        return self._run(tokens[:, None], self.state.layers).copy()

    def prefill(self, prompts, rows=None) -> np.ndarray:
        """Feed each sequence its prompt, in blocks of chunk_size tokens. -> logits (n, V) after each prompt's
        last token. ``prompts``: one (B, T) integer array, or a list of 1-D token arrays of any lengths (one per
        row); ``rows`` (default all): which of the runner's sequences the prompts continue.

        Prompts of equal length run together as one batch; each group continues from its rows' current state.
        """
        prompts, rows = self._check_prompts(prompts, rows)
        logits = np.empty((len(prompts), self.config.vocab_size), self.dtype)  # (n, V)
        by_length = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length, members in by_length.items():
            idx = np.stack([prompts[i] for i in members])  # (b, T)
            group_rows = [rows[i] for i in members]
            whole = group_rows == list(range(self._B))
            layers = self.state.layers if whole else [type(s)(*(a[group_rows] for a in s))
                                                      for s in self.state.layers]
            for t0 in range(0, length, self.chunk_size):
                out = self._run(idx[:, t0:t0 + self.chunk_size], layers)
            logits[members] = out
            if not whole:  # write the group's advanced state back into its rows
                for mine, theirs in zip(self.state.layers, layers):
                    for a, b in zip(mine, theirs):
                        a[group_rows] = b
        return logits

    def _run(self, tokens, layers) -> np.ndarray:
        """Tokens (b, T) with T <= chunk_size from the states ``layers`` (updated in place) -> logits (b, V), a
        view of an internal buffer that the next call overwrites."""
        kn, zero, one, matmuls = self._kernels, self._zero, self._one, self._pool.matmuls
        B, T = tokens.shape
        buf = self._views(B, T)
        x = buf.x
        np.take(self.emb, tokens, axis=0, out=x)  # (B, T, C) ln0 already folded in
        if self._matrix is not None:
            self._matrix.run(x, layers)
        for lw, s in zip(self.layers, layers):  # RWKV-4 (no layers here for the other generations)
            kn.time_mix_inputs(x, lw.ln1_w, lw.ln1_b, s.att_x, lw.att_mix_k, lw.att_mix_v, lw.att_mix_r, one,
                               buf.z, buf.xk, buf.xv, buf.xr)
            matmuls([(buf.xk_m, lw.att_key, buf.k_m),  # (B, T, C)
                     (buf.xv_m, lw.att_value, buf.v_m),  # (B, T, C)
                     (buf.xr_m, lw.att_receptance, buf.r_m)])  # (B, T, C)
            kn.wkv_gate(lw.w, lw.u, buf.k, buf.v, buf.r, s.att_aa, s.att_bb, s.att_pp, buf.g)
            matmuls([(buf.g_m, lw.att_output, buf.att_m)])  # (B, T, C)
            kn.channel_mix_inputs(x, buf.att, lw.ln2_w, lw.ln2_b, s.ffn_x, lw.ffn_mix_k, lw.ffn_mix_r, one,
                                  buf.z, buf.xk, buf.xr)
            matmuls([(buf.xk_m, lw.ffn_key, buf.fk_m),  # (B, T, F)
                     (buf.xr_m, lw.ffn_receptance, buf.fr_m)])  # (B, T, C)
            kn.relu_square(buf.fk.reshape(B * T, -1), zero)
            matmuls([(buf.fk_m, lw.ffn_value, buf.fv_m)])  # (B, T, C)
            kn.gate_residual(x.reshape(B * T, -1), buf.fr.reshape(B * T, -1), buf.fv.reshape(B * T, -1))
        z, logits = self._z_last[:B], self._logits[:B]
        kn.layernorm_rows(x[:, -1], self.ln_out_w, self.ln_out_b, z)  # (B, C) only the last token needs logits
        matmuls([(z, self.head, logits)])  # (B, V)
        if not np.isfinite(logits).all():
            raise FloatingPointError("RNNRunner produced non-finite logits: the parameters or the state contain "
                                     "NaN/inf")
        return logits


def _load_kernels():
    from ..backends.numba import infer4 as numba_infer

    return numba_infer


# ---------------------------------------------------------------------------------------------------------------
# States of several sequences (saving and restoring one is a file format: minirwkv/io/statefile.py)
# ---------------------------------------------------------------------------------------------------------------

def broadcast_state(state: State, batch_size: int) -> State:
    """A state of one sequence repeated for ``batch_size`` sequences (one prompt, many continuations)."""
    if state.batch_size != 1:
        raise ValueError(f"can only broadcast a state of one sequence, this one has {state.batch_size}")
    return State(tuple(type(s)(*(np.repeat(a, batch_size, axis=0) for a in s)) for s in state.layers))


class ReferenceRunner(_Runner):
    """RNNRunner's interface on ``minirwkv.prefill`` / ``minirwkv.rnn_step``: any array module, CuPy included.

    The sampling and streaming code of generate.py drive either runner. This one prepares nothing and allocates per
    call; its point is that it runs wherever the library runs, so a model trained on a GPU samples there too
    (``generate`` picks it for CuPy parameters). Token ids come in and logits go out as NumPy arrays: the sampler
    runs on the host, one (B, V) transfer per token. ``impl`` selects the WKV of the prompts' parallel pass.
    """

    def __init__(self, params: dict, batch_size: int = 1, impl: str = "auto"):
        self.params = params
        self.model = model_for(params, impl)  # checked once here; the per-token calls below check nothing
        self.config = self.model.config
        self.dtype = np.dtype(params["emb.weight"].dtype)
        self.impl = impl
        self._xp = self.model.engine.xp
        self.resize(batch_size)

    def resize(self, batch_size: int):
        """Change the batch size and reset the state to zeros."""
        self._set_batch_size(batch_size)
        self.reset()

    def set_state(self, state: State):
        check_state(state, self.model, self._B)
        xp = self._xp
        self.state = State(tuple(type(s)(*(xp.array(a, dtype=self.dtype) for a in s)) for s in state.layers))

    def step(self, tokens) -> np.ndarray:
        """tokens (B,) int -> logits (B, V) on the host; the state advanced (the model's RNN step)."""
        tokens = self._check_step(tokens)
        logits, self.state = self.model.step(self.params, self._xp.asarray(tokens), self.state)
        if not bool(self._xp.isfinite(logits).all()):
            raise FloatingPointError("ReferenceRunner produced non-finite logits: the parameters or the state "
                                     "contain NaN/inf")
        return to_numpy(logits)

    def prefill(self, prompts, rows=None) -> np.ndarray:
        """Each row's prompt in one parallel pass from its row's state (the model's forward). -> logits (n, V)."""
        xp = self._xp
        prompts, rows = self._check_prompts(prompts, rows)
        out = np.empty((len(prompts), self.config.vocab_size), self.dtype)  # (n, V)
        for i, (row, ids) in enumerate(zip(rows, prompts)):
            mine = State(tuple(type(s)(*(a[row:row + 1] for a in s)) for s in self.state.layers))
            logits, _, mine = self.model.forward(self.params, xp.asarray(ids[None]), mine)  # (1, T, V)
            out[i] = to_numpy(logits[0, -1])
            for layer, new in zip(self.state.layers, mine.layers):
                for a, b in zip(layer, new):
                    a[row:row + 1] = b
        return out
