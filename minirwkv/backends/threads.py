"""The CPU's threads: one runtime for every parallel part of a CPU engine (docs/threads.md).

Two thread pools that both busy-wait are what made a process of minirwkv slower on two cores than on one: OpenBLAS's
pthreads spin for ~0.1 s of CPU after every product (measured: 0.1 s of CPU per idle 0.5 s), and Numba's default
OpenMP layer spins too. Between two products the spinning BLAS threads hold the cores the Numba kernels need, and
when another program shares the machine they burn the time slices their partners are waiting for. So:

* **Products** (``ThreadPool.matmuls``) are split by us into blocks of rows or of columns, each a plain BLAS call
  on one BLAS thread, run by a pool of Python threads that sleep when idle (NumPy releases the GIL inside BLAS).
  The blocks are handed out one at a time from a shared counter, several per thread, so a thread that shares its
  core with another program simply takes fewer blocks. Several independent products (k, v, r of a layer) go out
  as one job: one wake-up, one wait.
* **BLAS** itself runs on one thread per call (``threadpoolctl``), so it never spins and never oversubscribes.
* **Numba** kernels run on its ``workqueue`` layer (its threads sleep when idle) with the same thread count, unless
  the user chose a layer with NUMBA_THREADING_LAYER.

How many threads (``resolve_threads``): an explicit ``threads=`` (the ``--threads`` flag), else the first of
MINIRWKV_NUM_THREADS and OMP_NUM_THREADS that is set, else the cores this process may run on. Applying that number
(``configure``) is a process-wide setting, done when a CPU engine is made (the edge), never on import.

Results agree across thread counts within float rounding, not bit for bit: a block of rows is computed by the same
BLAS routine as the whole, but BLAS may choose other kernels for other shapes.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading

import numpy as np

ENV_VARS = ("MINIRWKV_NUM_THREADS", "OMP_NUM_THREADS")
TASKS_PER_THREAD = 4  # blocks per thread and job: lets a thread on a busy core take fewer of them
MIN_BLOCK_FLOPS = 1 << 20  # ~12 us of BLAS: smaller blocks cost more in hand-over than they save
MIN_PARALLEL_FLOPS = 1 << 23  # a smaller product runs on the calling thread: a job's hand-over costs ~50-100 us
MIN_COLUMNS = 256  # a block of columns of a (K, N) C-ordered b reads rows of >= 1 KiB: still a stream
ROW_ALIGN = 8


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None = None) -> int:
    """The thread count to use: ``threads`` if given, else the environment (ENV_VARS), else ``usable_cores()``."""
    source = "threads"
    if threads is None:
        for name in ENV_VARS:
            if os.environ.get(name, "").strip():
                threads, source = os.environ[name].strip(), name
                break
        else:
            return usable_cores()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if isinstance(threads, bool) or n < 1 or str(threads).strip() not in (str(n), f"{n}.0"):
        raise ValueError(f"{source}={threads!r}: the thread count must be an integer >= 1 (this machine lets the "
                         f"process use {usable_cores()} cores)")
    return n


# ---------------------------------------------------------------------------------------------------------------
# Process-wide settings
# ---------------------------------------------------------------------------------------------------------------

_blas_limited = [None]  # the pid whose BLAS was set to one thread


def configure(n: int) -> None:
    """Apply ``n`` threads to this process: BLAS on one thread per call (our pool supplies the parallelism), Numba
    on the workqueue layer (if still unchosen) with min(n, its pool size) threads. Cheap to call again."""
    if _blas_limited[0] != os.getpid():
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")  # kept: not a context here, a setting
        _blas_limited[0] = os.getpid()
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ and not _numba_started():
        numba.config.THREADING_LAYER = "workqueue"  # read when the first parallel kernel launches
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _numba_started() -> bool:
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:  # "Threading layer is not initialized."
        return False


def observed() -> dict:
    """What the pools are set to now (for tests, the benchmarks and `minirwkv info`): BLAS threads per library
    (threadpoolctl), Numba's threads, pool size and layer."""
    import numba
    from threadpoolctl import threadpool_info

    blas = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    layer = numba.threading_layer() if _numba_started() else None
    return {"blas_threads": blas, "numba_threads": numba.get_num_threads(),
            "numba_pool_size": numba.config.NUMBA_NUM_THREADS, "numba_layer": layer}


# ---------------------------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------------------------

class ThreadPool:
    """``n`` participants: the calling thread and ``n - 1`` workers, started on the first parallel job (never on
    import) and restarted after a fork. Workers block on a queue between jobs: an idle pool uses no CPU."""

    def __init__(self, n: int):
        self.n = int(n)
        self._queues: list[queue.SimpleQueue] = []
        self._pid = None
        self._lock = threading.Lock()

    def __repr__(self):
        return f"ThreadPool(n={self.n})"

    def _workers(self) -> list[queue.SimpleQueue]:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._queues = [queue.SimpleQueue() for _ in range(self.n - 1)]
                    for i, q in enumerate(self._queues):
                        threading.Thread(target=_worker, args=(q,), name=f"minirwkv-{i + 1}", daemon=True).start()
                    self._pid = os.getpid()
        return self._queues

    def run(self, tasks: list) -> None:
        """Call every function in ``tasks`` (no arguments, no result) once, on up to n threads."""
        helpers = min(self.n, len(tasks)) - 1
        if helpers <= 0:
            for task in tasks:
                task()
            return
        counter = itertools.count()  # next() on it is atomic under the GIL: each task is taken exactly once
        done: queue.SimpleQueue = queue.SimpleQueue()

        def job():
            try:
                for i in iter(counter.__next__, None):
                    if i >= len(tasks):
                        break
                    tasks[i]()
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                return e
            return None

        for q in self._workers()[:helpers]:
            q.put((job, done))
        errors = [job()]
        errors += [done.get() for _ in range(helpers)]
        for e in errors:
            if e is not None:
                raise e

    def matmuls(self, products) -> None:
        """Compute every ``out = a @ b`` of ``products`` [(a (M, K), b (K, N), out (M, N)), ...] as one job: each
        product split into blocks of rows (M large) or of columns (M small: a matrix-vector product at batch 1)."""
        tasks = []
        for a, b, out in products:
            tasks += _blocks(a, b, out, self.n)
        self.run(tasks)

    def matmul(self, a, b, out=None):
        """a (M, K) @ b (K, N) -> out (M, N) (a new array unless given). 1-D ``a`` is one row."""
        if out is None:
            out = np.empty(a.shape[:-1] + b.shape[-1:], np.result_type(a, b))
        a2, out2 = (a[None], out[None]) if a.ndim == 1 else (a, out)
        self.matmuls([(a2, b, out2)])
        return out


def _worker(q: queue.SimpleQueue) -> None:
    while True:
        job, done = q.get()
        done.put(job())


def _blocks(a, b, out, n: int) -> list:
    """The tasks of one product: at most TASKS_PER_THREAD * n blocks of at least MIN_BLOCK_FLOPS each."""
    M, K = a.shape
    N = b.shape[1]
    flops = 2 * M * K * N
    count = min(TASKS_PER_THREAD * n, flops // MIN_BLOCK_FLOPS) if n > 1 and flops >= MIN_PARALLEL_FLOPS else 1
    # Each block repacks the operand it does not split (BLAS copies panels of both), so split the one that is
    # larger: rows when a (M, K) outweighs b (K, N), i.e. M >= N; columns otherwise (a few rows: bound by reading b)
    by_columns = min(count, N // MIN_COLUMNS)
    if count > 1 and M >= count * ROW_ALIGN and (M >= N or by_columns < 2):  # rows: out[i0:i1] = a[i0:i1] @ b
        edges = _edges(M, count, ROW_ALIGN)
        return [lambda i0=i0, i1=i1: np.matmul(a[i0:i1], b, out=out[i0:i1]) for i0, i1 in edges]
    count = by_columns
    if count > 1:  # blocks of columns: out[:, j0:j1] = a @ b[:, j0:j1]
        edges = _edges(N, count, MIN_COLUMNS // 16)
        return [lambda j0=j0, j1=j1: np.matmul(a, b[:, j0:j1], out=out[:, j0:j1]) for j0, j1 in edges]
    return [lambda: np.matmul(a, b, out=out)]


def _edges(size: int, count: int, align: int) -> list[tuple[int, int]]:
    """``count`` (or fewer) consecutive ranges covering 0..size, inner edges on multiples of ``align``."""
    step = max(align, -(-size // count // align) * align)
    return [(i, min(i + step, size)) for i in range(0, size, step)]


_pools: dict[int, ThreadPool] = {}
_pools_lock = threading.Lock()


def get_pool(n: int) -> ThreadPool:
    """The process's pool of ``n`` threads (one per n; creating it starts no thread). A task must not start a job
    on the pool that runs it (its worker would wait for itself)."""
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPool(n)
        return _pools[n]
