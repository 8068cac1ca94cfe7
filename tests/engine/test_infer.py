"""RNNRunner (minirwkv/infer.py) computes what the references compute: rnn_step token by token, prefill in
parallel mode, any chunking, ragged prompts; the ln0 fold is exact; a saved state continues identically."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minirwkv import ModelConfig, forward, init_params, init_state, prefill, rnn_step
from minirwkv.backends.numba import infer4 as numba_infer
from minirwkv.engine.infer import RNNRunner, broadcast_state, fold_ln0
from minirwkv.io.statefile import load_state, save_state
from minirwkv.layers import gate_forward, layernorm_forward, relu_square_forward
from minirwkv.testing import assert_close, make_wkv_inputs, wkv_inputs
from minirwkv.rwkv4.wkv import wkv_recurrent_forward, zero_state

CONFIG = ModelConfig(vocab_size=37, n_embd=12, n_layer=2, dim_ffn=20)
CONFIGS = {  # every generation RNNRunner runs: RWKV-4 here, RWKV-5.2 / RWKV-6 through engine/infer_matrix.py
    "4": CONFIG,
    "5": ModelConfig(vocab_size=37, n_embd=12, n_layer=2, dim_ffn=20, version="5", head_size=4),
    "6": ModelConfig(vocab_size=37, n_embd=12, n_layer=2, dim_ffn=20, version="6", head_size=4, d_mix_lora=3,
                     d_decay_lora=5),
}
VERSIONS = st.sampled_from(sorted(CONFIGS))


def random_params(config, dtype, seed=0):
    """The official init plus noise: init_params leaves five matrices per layer at exactly 0, which would hide
    mistakes in the paths they feed."""
    rng = np.random.default_rng(seed)
    params = init_params(config, seed=seed, dtype=np.float64)
    return {k: (v + rng.normal(0.0, 0.4, v.shape)).astype(dtype) for k, v in params.items()}


PARAMS = {np.float32: random_params(CONFIG, np.float32), np.float64: random_params(CONFIG, np.float64)}
ALL_PARAMS = {(v, dtype): random_params(c, dtype) for v, c in CONFIGS.items() for dtype in (np.float32, np.float64)}


def assert_state_close(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual.layers, expected.layers)):
        for name, x, y in zip(a._fields, a, e):
            assert_close(x, y, dtype, "same", what=f"{what} blocks.{i}.{name}")


@given(B=st.integers(1, 3), T=st.integers(1, 6), seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32,
                                                                                                   np.float64]),
       version=VERSIONS)
@example(B=1, T=1, seed=0, dtype=np.float32, version="4")
@example(B=2, T=3, seed=0, dtype=np.float64, version="6")
def test_step_equals_rnn_step(B, T, seed, dtype, version):
    params = ALL_PARAMS[(version, dtype)]
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T))
    runner = RNNRunner(params, batch_size=B)
    state = init_state(params, B)
    for t in range(T):
        got = runner.step(tokens[:, t])
        want, state = rnn_step(params, tokens[:, t], state)
        assert got.shape == (B, CONFIG.vocab_size) and got.dtype == dtype
        assert_close(got, want, dtype, "same", what=f"logits at t={t}")
    assert_state_close(runner.get_state(), state, dtype, "state")


@given(B=st.integers(1, 2), T=st.integers(1, 13), chunk=st.integers(1, 5), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]), version=VERSIONS)
@example(B=1, T=1, chunk=1, seed=0, dtype=np.float32, version="4")
@example(B=2, T=10, chunk=5, seed=1, dtype=np.float64, version="4")  # chunks that divide T exactly
@example(B=2, T=10, chunk=5, seed=1, dtype=np.float32, version="5")
@example(B=2, T=7, chunk=3, seed=2, dtype=np.float32, version="6")
def test_prefill_then_step_equals_parallel(B, T, chunk, seed, dtype, version):
    """Prefill of T tokens in blocks of `chunk`, then one step == the parallel forward of all T + 1 tokens."""
    params = ALL_PARAMS[(version, dtype)]
    idx = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T + 1))
    runner = RNNRunner(params, batch_size=B, chunk_size=chunk)
    last = runner.prefill(idx[:, :T])
    logits, state = prefill(params, idx[:, :T], impl="numpy")
    assert_close(last, logits[:, -1], dtype, "same", what="logits after the prompt")
    assert_state_close(runner.get_state(), state, dtype, "state after the prompt")
    nxt = runner.step(idx[:, T])
    assert_close(nxt, forward(params, idx, impl="numpy")[:, -1], dtype, "same", what="logits of the next token")


@given(x=wkv_inputs(np.float64, max_T=24), split=st.integers(0, 24), r_scale=st.sampled_from([1.0, 30.0, 200.0]),
       dtype=st.sampled_from([np.float32, np.float64]))
@example(x=make_wkv_inputs(1, 1, 5, k_scale=100.0), split=0, r_scale=200.0, dtype=np.float32)  # T = 1, |k| ~ 100
def test_wkv_gate_kernel_equals_wkv_step(x, split, r_scale, dtype):
    """numba_infer.wkv_gate (fastexp inside) == sigmoid(r) * the recurrent WKV of wkv.py, the state carried across
    two calls (the first ``split`` tokens, then the rest); r up to +-200 saturates the sigmoid on both sides."""
    x = x.astype(dtype)
    B, T, C = x.k.shape
    split = min(split, T)
    r = np.ascontiguousarray(x.gy * r_scale, dtype=dtype)  # (B, T, C)
    y, want_state = wkv_recurrent_forward(x.w, x.time_first, x.k, x.v)
    want = gate_forward(r, y)[0]
    state = zero_state(B, C, dtype)
    got = np.empty_like(x.k)
    for t0, t1 in ((0, split), (split, T)):
        if t1 > t0:
            numba_infer.wkv_gate(x.w, x.time_first, x.k[:, t0:t1], x.v[:, t0:t1], r[:, t0:t1], *state,
                                 got[:, t0:t1])
    assert_close(got, want, dtype, "same", what="sigmoid(r) * wkv")
    for name, a, b in zip(want_state._fields, state, want_state):
        assert_close(a, b, dtype, "same", what=f"state {name}")


@given(N=st.integers(1, 4), C=st.integers(1, 40), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_elementwise_kernels_equal_ops(N, C, seed, dtype):
    """layernorm_rows (its sums vectorised), relu_square and gate_residual against minirwkv.ops."""
    rng = np.random.default_rng(seed)
    x, r, kv = (rng.normal(3.0, 20.0, (N, C)).astype(dtype) for _ in range(3))
    weight, bias = rng.normal(1.0, 0.5, C).astype(dtype), rng.normal(0.0, 0.5, C).astype(dtype)
    out = np.empty_like(x)
    numba_infer.layernorm_rows(x, weight, bias, out)
    assert_close(out, layernorm_forward(x, weight, bias)[0], dtype, "same", what="layernorm_rows")
    h = x.copy()
    numba_infer.relu_square(h, dtype(0))
    assert_close(h, relu_square_forward(x)[0], dtype, "same", what="relu_square")
    res = x.copy()
    numba_infer.gate_residual(res, r, kv)
    assert_close(res, x + gate_forward(r, kv)[0], dtype, "same", what="gate_residual")


def test_prefill_continues_from_the_current_state():
    params = PARAMS[np.float32]
    idx = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 9))
    runner = RNNRunner(params, batch_size=2, chunk_size=3)
    runner.prefill(idx[:, :4])
    got = runner.prefill(idx[:, 4:])
    assert_close(got, forward(params, idx, impl="numpy")[:, -1], np.float32, "same", what="two prefills")


@pytest.mark.parametrize("version", sorted(CONFIGS))
def test_ragged_prompts_equal_one_prompt_at_a_time(version):
    params = ALL_PARAMS[(version, np.float32)]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, CONFIG.vocab_size, n) for n in (5, 2, 5, 1)]
    runner = RNNRunner(params, batch_size=4, chunk_size=2)
    got = runner.prefill(prompts)
    state = runner.get_state()
    for i, p in enumerate(prompts):
        logits, s = prefill(params, p[None], impl="numpy")
        assert_close(got[i], logits[0, -1], np.float32, "same", what=f"prompt {i}")
        for mine, ref in zip(state.layers, s.layers):
            for name, a, b in zip(mine._fields, mine, ref):
                assert_close(a[i:i + 1], b, np.float32, "same", what=f"prompt {i} state {name}")


@pytest.mark.parametrize("version", sorted(CONFIGS))
def test_prefill_of_some_rows_leaves_the_others(version):
    params = ALL_PARAMS[(version, np.float32)]
    runner = RNNRunner(params, batch_size=3)
    runner.prefill([np.array([1, 2, 3])] * 3)
    before = runner.get_state()
    runner.prefill([np.array([7, 8])], rows=[1])
    after = runner.get_state()
    for b, a in zip(before.layers, after.layers):
        for x, y in zip(b, a):
            np.testing.assert_array_equal(x[[0, 2]], y[[0, 2]])
            assert not np.array_equal(x[1], y[1])


def test_ln0_fold_is_exact():
    params = PARAMS[np.float32]
    idx = np.arange(CONFIG.vocab_size)
    folded = fold_ln0(params, rows_per_block=5)  # blocks that do not divide V
    unfolded = layernorm_forward(params["emb.weight"][idx], params["blocks.0.ln0.weight"],
                                 params["blocks.0.ln0.bias"])[0]
    np.testing.assert_array_equal(folded[idx], unfolded)


def test_saved_state_continues_identically(tmp_path):
    """One prompt's state saved, restored, and reused for several continuations.

    The promise (docs/inference.md): the same call shapes give the same bits (a restored batch-1 runner repeats a
    batch-1 runner exactly); a different batch size runs other BLAS kernels (matrix-vector vs matrix-matrix, other
    blockings), so batch-3 rows agree with batch-1 runs within the dtype's tolerance, not bit for bit."""
    params = PARAMS[np.float32]
    rng = np.random.default_rng(5)
    prompt, cont = rng.integers(0, CONFIG.vocab_size, 6), rng.integers(0, CONFIG.vocab_size, (3, 4))
    runner = RNNRunner(params, batch_size=1)
    logits = runner.prefill([prompt])
    save_state(tmp_path / "prompt.npz", runner.get_state(), logits)
    direct = [runner.step(cont[0, t:t + 1]) for t in range(4)]

    state, saved_logits = load_state(tmp_path / "prompt.npz")
    np.testing.assert_array_equal(saved_logits, logits)  # the file keeps the bits
    restored = RNNRunner(params, batch_size=1)
    restored.set_state(state)
    for t in range(4):  # same shapes, same kernels: the same bits
        np.testing.assert_array_equal(restored.step(cont[0, t:t + 1]), direct[t])
    many = RNNRunner(params, batch_size=3)
    many.set_state(broadcast_state(state, 3))
    again = [many.step(cont[:, t]) for t in range(4)]
    for row in range(3):
        ref = RNNRunner(params, batch_size=1)
        ref.set_state(state)
        for t in range(4):
            want = ref.step(cont[row, t:t + 1])
            assert_close(again[t][row], want[0], np.float32, "same", what=f"batch-3 row {row} at t={t}")


def test_prefill_of_permuted_rows_writes_each_row(tmp_path):
    """All rows given in another order ([2, 0, 1]) is not the in-order case: prompt i continues row rows[i]."""
    params = PARAMS[np.float64]
    rng = np.random.default_rng(6)
    first = rng.integers(0, CONFIG.vocab_size, (3, 4))
    prompts = [rng.integers(0, CONFIG.vocab_size, 3) for _ in range(3)]
    rows = [2, 0, 1]
    runner = RNNRunner(params, batch_size=3)
    runner.prefill(first)  # rows start from different states, so a mix-up shows in the logits too
    got = runner.prefill(prompts, rows=rows)
    state = runner.get_state()
    for i, row in enumerate(rows):
        logits, want = prefill(params, np.concatenate([first[row], prompts[i]])[None], impl="numpy")
        assert_close(got[i], logits[0, -1], np.float64, "same", what=f"logits of prompt {i} (row {row})")
        for mine, ref in zip(state.layers, want.layers):
            for name, a, b in zip(mine._fields, mine, ref):
                assert_close(a[row:row + 1], b, np.float64, "same", what=f"row {row} state {name}")


def test_failed_state_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """save_state writes atomically: a write that fails half-way (disk full) leaves the old file and no temp."""
    params = PARAMS[np.float32]
    runner = RNNRunner(params)
    path = tmp_path / "state.npz"
    save_state(path, runner.get_state())
    before = path.read_bytes()
    runner.step(np.array([3]))

    def disk_full(file, **arrays):
        file.write(b"PK half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_state(path, runner.get_state())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


def test_save_state_removes_orphan_temps(tmp_path):
    """A killed earlier write left its temporary file (a dead writer's pid): the next save in that folder removes
    it; a file of another name pattern stays."""
    from minirwkv.io.atomic import temp_name

    dead = _dead_pid()
    orphan = tmp_path / temp_name("state.npz", pid=dead)
    orphan.write_bytes(b"half")
    foreign = tmp_path / ".state.npz.tmp"
    foreign.write_bytes(b"mine")
    save_state(tmp_path / "state.npz", RNNRunner(PARAMS[np.float32]).get_state())
    assert not orphan.exists() and foreign.exists()


def _dead_pid() -> int:
    """The pid of a process that has exited (a child, waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_reference_runner_checks_once_at_setup(monkeypatch):
    """ReferenceRunner validates the parameters when it is made and calls the unchecked Model per token: with the
    parameter check broken after setup, step and prefill still run (and equal RNNRunner within tolerance)."""
    import minirwkv.api
    from minirwkv.engine.infer import ReferenceRunner

    params = PARAMS[np.float64]
    ref, fast = ReferenceRunner(params, batch_size=2, impl="numpy"), RNNRunner(params, batch_size=2)

    def no_more_checks(*args, **kwargs):
        raise AssertionError("check_params called on the per-token path")

    monkeypatch.setattr(minirwkv.api, "check_params", no_more_checks)
    prompts = [np.array([1, 2, 3]), np.array([4, 5])]
    assert_close(ref.prefill(prompts, rows=[1, 0]), fast.prefill(prompts, rows=[1, 0]), np.float64, "same",
                 what="prefill")
    assert_close(ref.step(np.array([6, 7])), fast.step(np.array([6, 7])), np.float64, "same", what="step")
    with pytest.raises(ValueError, match="batch size"):
        ref.step(np.array([1]))


def test_get_state_is_a_copy():
    runner = RNNRunner(PARAMS[np.float32])
    saved = runner.get_state()
    runner.step(np.array([3]))
    assert np.all(saved.layers[0].att_x == 0)


def test_bad_input():
    params = PARAMS[np.float32]
    runner = RNNRunner(params, batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        runner.step(np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        runner.step(np.array([1, CONFIG.vocab_size]))
    with pytest.raises(ValueError, match="one prompt per row"):
        runner.prefill([np.array([1])])
    with pytest.raises(ValueError, match="empty"):
        runner.prefill([np.array([1]), np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="batch_size"):
        RNNRunner(params, batch_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        RNNRunner(params, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        runner.set_state(init_state(params, 3))


def test_load_state_refuses_other_files(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved RNN state"):
        load_state(tmp_path / "plain.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array("minirwkv-rnn-state"), x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a saved RNN state"):
        load_state(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a saved RNN state"):
        load_state(tmp_path / "junk.npz")


def test_bench_quick_runs(capsys):
    from minirwkv.bench.infer import bytes_per_token, main, random_params

    rows = main(["--quick", "--no-official"])
    assert rows[0]["model"] == "tiny" and rows[0]["rnn_tok_s"] > 0 and rows[0]["prefill_tok_s"] > 0
    assert "prefill/RNN" in capsys.readouterr().out
    params = random_params(CONFIG)
    matrices = sum(a.size for k, a in params.items() if a.ndim == 2) - params["emb.weight"].size
    assert bytes_per_token(params) == 4 * (matrices + CONFIG.n_embd)  # every matrix, the head, one embedding row
