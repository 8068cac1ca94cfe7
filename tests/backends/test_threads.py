"""The CPU thread runtime (backends/threads.py): how many threads, the pool, the split products, the settings.

resolve_threads takes an explicit count over MINIRWKV_NUM_THREADS over OMP_NUM_THREADS over the usable cores and
names the source of a bad value; ThreadPool.run calls every task exactly once, on more than one thread, re-raises a
task's exception and still works afterwards and after a fork; ThreadPool.matmul/matmuls == np.matmul to the dtype's
tolerance for ugly, transposed and 1-D operands, with the split thresholds lowered so that small products really are
split (rows and columns); make_engine applies its thread count to Numba and BLAS; the model's loss, gradients and RNN
logits agree across thread counts to the dtype's tolerance (not bit for bit: BLAS may pick other kernels per block).
"""
import json
import os
import select
import sys
import threading
import time

import numba
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from threadpoolctl import threadpool_info

from helpers import random_params, random_tokens
from minirwkv import api
from minirwkv.backends import threads
from minirwkv.backends.engine import make_engine
from minirwkv.config import ModelConfig
from minirwkv.engine.infer import RNNRunner
from minirwkv.testing import assert_close

DTYPES = [np.float32, np.float64]
# Thresholds low enough that every product of the tests (a few hundred flops and up) is split: the real ones
# (MiB of flops) would leave every product here on the calling thread, and the tests would check nothing parallel.
SMALL_THRESHOLDS = dict(MIN_PARALLEL_FLOPS=1, MIN_BLOCK_FLOPS=1, MIN_COLUMNS=32)  # column blocks aligned to 2
FORK_TIMEOUT_S = 30.0  # a child that deadlocks in the pool fails the test instead of hanging it


@pytest.fixture(autouse=True)
def _restore_numba_threads():
    """configure() sets Numba's thread count process-wide: put it back for the tests that follow."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


@pytest.fixture
def clean_env(monkeypatch):
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def small_thresholds(monkeypatch):
    for name, value in SMALL_THRESHOLDS.items():
        monkeypatch.setattr(threads, name, value)


@pytest.fixture
def block_counts(monkeypatch):
    """The number of tasks _blocks made for every product, in call order (so a test can see that splits happened)."""
    counts = []
    original = threads._blocks

    def counting(a, b, out, n):
        tasks = original(a, b, out, n)
        counts.append(len(tasks))
        return tasks

    monkeypatch.setattr(threads, "_blocks", counting)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# resolve_threads
# ---------------------------------------------------------------------------------------------------------------

def test_explicit_count_wins_over_the_environment(clean_env):
    clean_env.setenv("MINIRWKV_NUM_THREADS", "5")
    clean_env.setenv("OMP_NUM_THREADS", "6")
    assert threads.resolve_threads(3) == 3
    assert threads.resolve_threads(np.int64(7)) == 7


def test_environment_order(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "6")
    assert threads.resolve_threads() == 6
    clean_env.setenv("MINIRWKV_NUM_THREADS", " 5 ")
    assert threads.resolve_threads() == 5
    clean_env.setenv("MINIRWKV_NUM_THREADS", "")  # set but empty: as if unset
    assert threads.resolve_threads() == 6
    clean_env.delenv("OMP_NUM_THREADS")
    clean_env.delenv("MINIRWKV_NUM_THREADS")
    assert threads.resolve_threads() == threads.usable_cores()


def test_default_is_the_usable_cores(clean_env):
    assert threads.resolve_threads() == threads.resolve_threads(None) == threads.usable_cores()
    if hasattr(os, "sched_getaffinity"):
        assert threads.usable_cores() == len(os.sched_getaffinity(0))
    assert threads.usable_cores() >= 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "2x"])
@pytest.mark.parametrize("name", threads.ENV_VARS)
def test_bad_environment_value_names_its_variable(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        threads.resolve_threads()
    if name == "OMP_NUM_THREADS":  # a good MINIRWKV_NUM_THREADS comes first: the bad OMP value is never read
        clean_env.setenv("MINIRWKV_NUM_THREADS", "2")
        assert threads.resolve_threads() == 2


@pytest.mark.parametrize("value", [0, -1, True, False, 1.5, "two", "0"])
def test_bad_explicit_value_raises(clean_env, value):
    clean_env.setenv("MINIRWKV_NUM_THREADS", "2")  # good, but the explicit value is what is checked
    with pytest.raises(ValueError, match="threads="):
        threads.resolve_threads(value)


# ---------------------------------------------------------------------------------------------------------------
# ThreadPool.run
# ---------------------------------------------------------------------------------------------------------------

def test_get_pool_is_one_per_count_and_starts_no_thread():
    n = 11  # a count no other test uses: its pool is new
    before = threading.active_count()
    pool = threads.get_pool(n)
    assert threads.get_pool(n) is pool and pool.n == n
    assert threads.get_pool(n - 1) is not pool
    assert threading.active_count() == before


@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_task_runs_exactly_once(n):
    pool = threads.ThreadPool(n)  # 3 threads on 2 cores: allowed
    for n_tasks in (0, 1, 2, 1000):
        calls = []
        pool.run([lambda i=i: calls.append(i) for i in range(n_tasks)])  # list.append is atomic under the GIL
        assert sorted(calls) == list(range(n_tasks))


def test_a_task_exception_reaches_the_caller_and_the_pool_still_works():
    pool = threads.ThreadPool(3)

    class Boom(RuntimeError):
        pass

    def boom():
        raise Boom("task 17")

    for _ in range(3):  # the pool's threads survive a failed job, again and again
        tasks = [lambda: None] * 40
        tasks[17] = boom
        with pytest.raises(Boom, match="task 17"):
            pool.run(tasks)
        calls = []
        pool.run([lambda i=i: calls.append(i) for i in range(200)])
        assert sorted(calls) == list(range(200))


def _idents_of_sleeping_tasks(pool, n_tasks=40):
    idents = []

    def task():
        time.sleep(0.01)  # releases the GIL: another thread can take the next task meanwhile
        idents.append(threading.get_ident())

    pool.run([task] * n_tasks)
    assert len(idents) == n_tasks
    return set(idents)


def test_work_runs_on_more_than_one_thread():
    pool = threads.ThreadPool(2)
    idents = _idents_of_sleeping_tasks(pool)
    assert len(idents) == 2, f"{len(idents)} thread(s) ran the tasks of a pool of 2"
    assert threading.get_ident() in idents  # the caller takes part
    assert len(_idents_of_sleeping_tasks(threads.ThreadPool(1))) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux only")
def test_pool_works_in_a_forked_child():
    pool = threads.ThreadPool(2)
    parent_idents = _idents_of_sleeping_tasks(pool)  # the workers exist in the parent before the fork
    assert len(parent_idents) == 2
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 33)), rng.standard_normal((33, 40))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: always leaves through os._exit, never back into pytest
        code = 1
        try:
            os.close(read_fd)
            calls = []
            pool.run([lambda i=i: calls.append(i) for i in range(500)])
            idents = _idents_of_sleeping_tasks(pool)
            with pytest.MonkeyPatch.context() as mp:
                for name, value in SMALL_THRESHOLDS.items():
                    mp.setattr(threads, name, value)
                err = float(np.max(np.abs(pool.matmul(a, b) - a @ b)))
            result = dict(once=sorted(calls) == list(range(500)), n_idents=len(idents), matmul_err=err)
            os.write(write_fd, json.dumps(result).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001  (reported to the parent)
            os.write(write_fd, json.dumps(dict(error=repr(e))).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], FORK_TIMEOUT_S)
        if not ready:
            os.kill(pid, 9)
            pytest.fail(f"the forked child did not answer in {FORK_TIMEOUT_S} s (a pool deadlocked after fork?)")
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in result, result
    assert os.waitstatus_to_exitcode(status) == 0
    assert result["once"]
    assert result["n_idents"] == 2
    assert result["matmul_err"] <= 1e-12
    assert len(_idents_of_sleeping_tasks(pool)) == 2  # and the parent's pool is unharmed


# ---------------------------------------------------------------------------------------------------------------
# ThreadPool.matmul / matmuls == np.matmul
# ---------------------------------------------------------------------------------------------------------------

def _operands(rng, M, K, N, dtype, transposed):
    a = rng.standard_normal((M, K)).astype(dtype)
    if transposed:  # linear_forward passes weight.T: an F-ordered view of an (N, K) weight
        b = rng.standard_normal((N, K)).astype(dtype).T
    else:
        b = rng.standard_normal((K, N)).astype(dtype)
    return a, b


def _same_product(actual, a, b, what):
    """== a @ b to the dtype's tolerance, relative to the size of the terms summed (the result may cancel)."""
    expected = np.matmul(a, b)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    terms = float(np.max(np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64), initial=0.0))
    assert_close(actual, expected, expected.dtype, "same", what, scale=terms)


def _written_regions(a, b, n):
    """Run _blocks' tasks one by one into a NaN-filled out: the (rows, columns) each task wrote."""
    out = np.full((a.shape[0], b.shape[1]), np.nan)
    regions = []
    tasks = threads._blocks(a, b, out, n)
    for task in tasks:
        before = np.isnan(out)
        task()
        rows, cols = np.nonzero(before & ~np.isnan(out))
        regions.append((set(rows.tolist()), set(cols.tolist())))
    assert not np.isnan(out).any(), "the blocks do not cover the product"
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    return regions


@pytest.mark.parametrize("M, K, N, path", [(300, 70, 64, "rows"), (256, 8, 256, "rows"),
                                           (1, 70, 700, "columns"), (5, 3, 300, "columns")])
def test_blocks_split_into_rows_or_columns(small_thresholds, M, K, N, path):
    rng = np.random.default_rng(1)
    a, b = _operands(rng, M, K, N, np.float64, transposed=False)
    regions = _written_regions(a, b, n=2)
    assert 2 <= len(regions) <= threads.TASKS_PER_THREAD * 2
    for rows, cols in regions:  # disjoint blocks of whole rows, or of whole columns
        if path == "rows":
            assert cols == set(range(N)) and len(rows) < M
        else:
            assert rows == set(range(M)) and len(cols) < N
    assert sum(len(rows if path == "rows" else cols) for rows, cols in regions) == (M if path == "rows" else N)


def test_blocks_do_not_split_one_thread_or_small_products():
    a, b = np.ones((300, 70)), np.ones((70, 700))
    assert len(threads._blocks(a, b, np.empty((300, 700)), 1)) == 1  # one thread: never split
    small = np.ones((2, 3)), np.ones((3, 4))
    assert len(threads._blocks(*small, np.empty((2, 4)), 4)) == 1  # under MIN_PARALLEL_FLOPS (the real one)
    big = np.ones((1024, 1024)), np.ones((1024, 1024))
    assert len(threads._blocks(*big, np.empty((1024, 1024)), 2)) == threads.TASKS_PER_THREAD * 2


@given(M=st.integers(1, 300), K=st.integers(1, 70), N=st.integers(1, 700), n=st.sampled_from([2, 3]),
       dtype=st.sampled_from(DTYPES), transposed=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(M=1, K=70, N=700, n=2, dtype=np.float32, transposed=True, seed=0)  # batch 1: column blocks
@example(M=300, K=70, N=33, n=3, dtype=np.float64, transposed=False, seed=1)  # many rows: row blocks
@example(M=299, K=1, N=1, n=2, dtype=np.float32, transposed=True, seed=2)  # K = 1, N = 1
def test_matmul_equals_numpy(M, K, N, n, dtype, transposed, seed):
    rng = np.random.default_rng(seed)
    a, b = _operands(rng, M, K, N, dtype, transposed)
    pool = threads.get_pool(n)
    with pytest.MonkeyPatch.context() as mp:  # (not a fixture: hypothesis reuses function-scoped ones)
        for name, value in SMALL_THRESHOLDS.items():
            mp.setattr(threads, name, value)
        _same_product(pool.matmul(a, b), a, b, f"matmul ({M}, {K}) @ ({K}, {N})")
        out = np.full((M, N), np.nan, dtype)
        assert pool.matmul(a, b, out=out) is out
        _same_product(out, a, b, "matmul out=")
        _same_product(pool.matmul(a[0], b), a[0], b, "matmul 1-D a")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_out_none_and_1d(small_thresholds, block_counts, dtype):
    rng = np.random.default_rng(2)
    pool = threads.get_pool(2)
    a, b = _operands(rng, 1, 70, 700, dtype, transposed=True)
    y = pool.matmul(a[0], b)  # a vector: a new (N,) array
    assert y.shape == (700,) and y.dtype == dtype
    _same_product(y, a[0], b, "1-D a")
    a, b = _operands(rng, 300, 70, 40, dtype, transposed=False)
    y = pool.matmul(a, b)
    assert y.shape == (300, 40) and y.dtype == dtype and y.flags.c_contiguous
    _same_product(y, a, b, "2-D a")
    assert len(block_counts) == 2 and min(block_counts) > 1, block_counts  # both were split
    y = pool.matmul(a.astype(np.float32), b.astype(np.float64))
    assert y.dtype == np.float64  # the promoted dtype, as np.matmul


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmuls_several_products_in_one_job(small_thresholds, block_counts, dtype):
    rng = np.random.default_rng(3)
    pool = threads.get_pool(3)
    shapes = [(2, 64, 64, True), (2, 64, 256, True), (300, 70, 64, False), (1, 1, 1, False), (37, 5, 700, True)]
    products = []
    for M, K, N, transposed in shapes:
        a, b = _operands(rng, M, K, N, dtype, transposed)
        products.append((a, b, np.full((M, N), np.nan, dtype)))
    pool.matmuls(products)
    for a, b, out in products:
        _same_product(out, a, b, f"matmuls {a.shape} @ {b.shape}")
    assert len(block_counts) == len(shapes)
    assert sum(c > 1 for c in block_counts) == len(shapes) - 1, block_counts  # all but (1, 1, 1) were split


# ---------------------------------------------------------------------------------------------------------------
# The settings are honoured
# ---------------------------------------------------------------------------------------------------------------

def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]


def test_make_engine_applies_its_thread_count(clean_env):
    for n in (1, 2, 1):
        engine = make_engine("numba", "cpu", threads=n)
        assert engine.threads == n and engine.pool.n == n
        assert engine.pool is threads.get_pool(n)
        assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
        blas = _blas_threads()
        assert blas and all(t == 1 for t in blas), threadpool_info()
        seen = threads.observed()
        assert seen["numba_threads"] == numba.get_num_threads() and seen["blas_threads"] == blas


def test_make_engine_reads_the_environment(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "2")
    clean_env.setenv("MINIRWKV_NUM_THREADS", "1")
    engine = make_engine("numba", "cpu")
    assert engine.threads == 1 and engine.pool.n == 1 and numba.get_num_threads() == 1
    clean_env.delenv("MINIRWKV_NUM_THREADS")
    assert make_engine("numba", "cpu").threads == 2
    clean_env.setenv("MINIRWKV_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="MINIRWKV_NUM_THREADS"):
        make_engine("numba", "cpu")


def test_engine_linear_uses_its_pool(small_thresholds, block_counts):
    engine = make_engine("numba", "cpu", threads=2)
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((2, 5, 64)), rng.standard_normal((256, 64))
    y, cache = engine.ops.linear_forward(x, w)
    _same_product(y.reshape(-1, 256), x.reshape(-1, 64), w.T, "linear_forward")
    assert block_counts and max(block_counts) > 1


# ---------------------------------------------------------------------------------------------------------------
# Results agree across thread counts
# ---------------------------------------------------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=64, n_embd=64, n_layer=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_grads_agree_across_thread_counts(clean_env, small_thresholds, block_counts, dtype):
    params = random_params(CONFIG, seed=5, dtype=dtype)  # api.init_params plus noise: no gradient trivially zero
    idx, targets = random_tokens(CONFIG, 2, 16, seed=6), random_tokens(CONFIG, 2, 16, seed=7)
    results = {}
    for n in (1, 2):
        block_counts.clear()
        results[n] = api.loss_and_grads(params, idx, targets, impl=make_engine("numba", "cpu", threads=n))
        split = sum(c > 1 for c in block_counts)
        assert (split > 0) == (n > 1), f"threads={n}: {split} of {len(block_counts)} products split"
    (loss1, grads1), (loss2, grads2) = results[1], results[2]
    assert_close(np.asarray(loss2), np.asarray(loss1), dtype, "same", "loss")
    assert grads1.keys() == grads2.keys() == params.keys()
    for name in grads1:
        assert grads2[name].dtype == dtype
        assert_close(grads2[name], grads1[name], dtype, "same", f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_runner_agrees_across_thread_counts(clean_env, small_thresholds, block_counts, dtype):
    params = random_params(CONFIG, seed=8, dtype=dtype)
    tokens = random_tokens(CONFIG, 2, 6, seed=9)
    logits = {}
    for n in (1, 2):
        block_counts.clear()
        runner = RNNRunner(params, batch_size=2, threads=n)
        assert runner.threads == n
        logits[n] = [runner.step(tokens[:, t]) for t in range(tokens.shape[1])]
        split = sum(c > 1 for c in block_counts)
        assert (split > 0) == (n > 1), f"threads={n}: {split} of {len(block_counts)} products split"
    for t, (one, two) in enumerate(zip(logits[1], logits[2])):
        assert two.shape == (2, CONFIG.vocab_size) and two.dtype == dtype
        assert_close(two, one, dtype, "same", f"logits at step {t}")


def test_a_large_product_with_few_columns_still_splits_by_rows():
    """(400, 4096) @ (4096, 500): fewer rows than columns, but too few columns for column blocks: rows it is."""
    a = np.ones((400, 4096), np.float32)
    b = np.ones((4096, 500), np.float32)
    out = np.empty((400, 500), np.float32)
    assert len(threads._blocks(a, b, out, 2)) > 1
