"""Data-parallel training across processes with MPI (docs/distributed.md).

One process per core (or per GPU), each holding the whole model, as nanoGPT's DDP and llm.c's multi-GPU trainer
do. A step on N processes is the single-process step of the same global batch:

    rank r:  x_r, y_r = rows [r B/N, (r+1) B/N) of batch(seed, step)     its share of the global batch B
             loss_r, g_r = loss_and_grads(params, x_r, y_r)               mean over its B/N rows
    all:     g = (1/N) sum_r g_r,  loss = (1/N) sum_r loss_r              ONE Allreduce of one flat buffer
             clip(g), AdamW(params, g)                                    identical on every rank

Since every share has B/N rows, the mean of the N means is the mean over the B rows: the gradient of the
single-process batch, up to the order of the float sums. Every rank starts from rank 0's parameters (a broadcast),
takes identical updates, and so holds identical parameters; rank 0 alone evaluates, logs and writes files.

``mpi4py`` is imported only when a run is launched by ``mpiexec`` (or ``--distributed=mpi``): importing minirwkv
never imports it. The launcher is recognised by the variables it sets in each process's environment, read when
training starts: ``PMI_SIZE`` (MPICH's hydra, Intel MPI, Slurm's PMI), ``OMPI_COMM_WORLD_SIZE`` (Open MPI),
``MV2_COMM_WORLD_SIZE`` (MVAPICH).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import NamedTuple

import numpy as np

from ..devices import is_cupy, to_numpy

MODES = ("auto", "off", "mpi")
# the per-process variables that MPI launchers set: the number of processes started
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
INSTALL = "pip install 'minirwkv[dist]'"


def launched_size(environ=None) -> tuple[int, str | None]:
    """(number of processes the launcher started, the variable that says so), or (1, None) outside a launcher."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARS:
        value = environ.get(name)
        if value:
            try:
                return int(value), name
            except ValueError:
                continue
    return 1, None


def launched_rank(environ=None) -> int:
    """This process's rank as the launcher numbered it (0 outside a launcher), without importing mpi4py: what the
    command line uses to print its closing lines and errors once, from rank 0."""
    environ = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The flat gradient buffer
# ---------------------------------------------------------------------------------------------------------------

class FlatLayout(NamedTuple):
    """Where each parameter lives in one contiguous 1-D buffer, in a fixed (sorted) key order.

    The order must be the same on every rank, whatever order the dict was built in (init_params or a checkpoint):
    sorted names are. ``extra`` slots follow the parameters (the loss rides in the last one).
    """
    keys: tuple  # sorted parameter names
    shapes: tuple  # one shape per key
    offsets: tuple  # start of each key's slice; offsets[-1] is the number of parameter entries
    extra: int  # slots after the parameters

    @property
    def size(self) -> int:
        return self.offsets[-1] + self.extra


def flat_layout(params: dict, extra: int = 1) -> FlatLayout:
    keys = tuple(sorted(params))
    shapes = tuple(tuple(params[k].shape) for k in keys)
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + int(np.prod(shape, dtype=np.int64)))
    return FlatLayout(keys, shapes, tuple(offsets), extra)


def pack(layout: FlatLayout, arrays: dict, extra=(), xp=np, dtype=None):
    """arrays (key -> array of the layout's shapes) and the ``extra`` numbers -> one flat buffer (size,)."""
    dtype = arrays[layout.keys[0]].dtype if dtype is None else dtype
    buf = xp.empty(layout.size, dtype=dtype)  # (size,)
    for k, start, stop in zip(layout.keys, layout.offsets, layout.offsets[1:]):
        buf[start:stop] = arrays[k].reshape(-1)
    if len(extra) != layout.extra:
        raise ValueError(f"pack: the layout has {layout.extra} extra slot(s), got {len(extra)} value(s)")
    for i, value in enumerate(extra):
        buf[layout.offsets[-1] + i] = value
    return buf


def unpack(layout: FlatLayout, buf) -> tuple[dict, list]:
    """The inverse of ``pack``: (key -> view of ``buf`` in its shape, the extra numbers as Python floats)."""
    arrays = {k: buf[start:stop].reshape(shape)
              for k, shape, start, stop in zip(layout.keys, layout.shapes, layout.offsets, layout.offsets[1:])}
    extra = [float(buf[layout.offsets[-1] + i]) for i in range(layout.extra)]
    return arrays, extra


# ---------------------------------------------------------------------------------------------------------------
# The group of processes
# ---------------------------------------------------------------------------------------------------------------

class SingleProcess:
    """The world of a run without MPI: rank 0 of 1. Training takes the single-process path and never calls these."""

    rank, size, local_size, backend = 0, 1, 1, "none"

    def allreduce_mean(self, buf):
        return buf

    def bcast_(self, buf):
        return buf

    def bcast(self, obj):
        return obj

    def allgather(self, obj):
        return [obj]


class MPIWorld:
    """The processes of ``comm``, an mpi4py communicator; ``mpi`` is the ``mpi4py.MPI`` module (for its constants).
    Tests pass a fake communicator and constants with the same names, and need no MPI.

    Collectives on NumPy buffers go through MPI directly. CuPy buffers go through NCCL when ``nccl_comm`` is given
    (``cupy.cuda.nccl``: GPU to GPU, no copy to the host), else through the host (a device -> host copy, the MPI
    call, host -> device); a CUDA-aware MPI would take device pointers directly, but the ``mpich`` wheel is not one.
    """

    def __init__(self, comm, mpi, nccl_comm=None):
        self.comm = comm
        self.mpi = mpi
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.local_size = comm.Split_type(mpi.COMM_TYPE_SHARED).Get_size()  # processes sharing this machine's cores
        self.nccl = nccl_comm
        self.backend = "nccl" if nccl_comm is not None else "mpi"

    def allreduce_mean(self, buf):
        """buf <- (1/N) sum over ranks of buf, in place: the one collective of a training step."""
        if is_cupy(buf):
            if self.nccl is not None:
                _nccl_allreduce_sum(self.nccl, buf)
            else:  # through the host
                host = buf.get()
                self.comm.Allreduce(self.mpi.IN_PLACE, host, op=self.mpi.SUM)
                buf.set(host)
        else:
            self.comm.Allreduce(self.mpi.IN_PLACE, buf, op=self.mpi.SUM)
        buf /= self.size  # the same division on every rank: identical results everywhere
        return buf

    def bcast_(self, buf):
        """buf <- rank 0's buf, in place (the starting parameters and optimizer state)."""
        if is_cupy(buf):
            host = buf.get()
            self.comm.Bcast(host, root=0)
            buf.set(host)
        else:
            self.comm.Bcast(buf, root=0)
        return buf

    def bcast(self, obj):
        """A small Python object from rank 0 (pickled): decisions only rank 0 can take."""
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj):
        return self.comm.allgather(obj)


def _nccl_allreduce_sum(nccl_comm, buf):
    import cupy
    from cupy.cuda import nccl

    kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    stream = cupy.cuda.get_current_stream()
    nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kinds[np.dtype(buf.dtype)], nccl.NCCL_SUM, stream.ptr)
    stream.synchronize()


def init_world(mode: str = "auto", device: str = "cpu", environ=None):
    """The processes this run is one of: SingleProcess, or an MPIWorld over MPI.COMM_WORLD.

    auto: MPI when a launcher started more than one process, else the single-process path (mpi4py not imported).
    off:  single-process; refused under a launcher with N > 1 (N copies would write the same out_dir).
    mpi:  MPI always (also with one process), an error when mpi4py is missing.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    n, var = launched_size(environ)
    if mode == "off":
        if n > 1:
            raise ValueError(f"--distributed=off, but this is one of {n} processes started by an MPI launcher "
                             f"({var}={n}): they would all train alone and write the same out_dir. Drop "
                             f"--distributed=off (auto joins them into one data-parallel run) or run one process")
        return SingleProcess()
    if mode == "auto" and n <= 1:
        return SingleProcess()
    try:
        from mpi4py import MPI
    except ImportError as e:
        why = f"this is one of {n} processes started by an MPI launcher ({var}={n})" if n > 1 else \
            "--distributed=mpi was asked for"
        raise RuntimeError(f"{why}, but mpi4py cannot be imported ({e}): install the dist extra, {INSTALL} "
                           f"(mpi4py and the MPICH library as wheels), and launch with its mpiexec") from None
    comm = MPI.COMM_WORLD
    if n > 1 and comm.Get_size() != n:
        raise RuntimeError(f"the launcher started {n} processes ({var}={n}) but MPI sees {comm.Get_size()}: "
                           f"mpiexec belongs to another MPI library than the one mpi4py loaded "
                           f"({MPI.Get_library_version().splitlines()[0].strip()}). Launch with the mpiexec of "
                           f"the same installation (with the dist extra: the mpiexec next to its python)")
    nccl_comm = _nccl_comm(comm) if device == "cuda" and comm.Get_size() > 1 else None
    return MPIWorld(comm, MPI, nccl_comm)


def _nccl_comm(comm):
    """One GPU per process (the process's rank among those on its machine), and an NCCL communicator over them,
    its id sent from rank 0 over MPI. Without NCCL in CuPy: None, and reductions go through the host."""
    import cupy

    from mpi4py import MPI

    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    cupy.cuda.Device(local_rank % cupy.cuda.runtime.getDeviceCount()).use()
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    if not getattr(nccl, "available", True):
        return None
    uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    return nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


# ---------------------------------------------------------------------------------------------------------------
# What the training loop calls
# ---------------------------------------------------------------------------------------------------------------

def average_gradients(world, layout: FlatLayout, grads: dict | None, loss: float, xp=np, dtype=None):
    """(mean loss, mean gradients) over the ranks, with one Allreduce of one flat buffer.

    ``grads=None`` (this rank's forward failed) sends NaN: every rank then sees a non-finite loss and stops at the
    same step, instead of the others waiting forever in the collective.
    """
    if grads is None:
        buf = xp.full(layout.size, np.nan, dtype=dtype)
    else:
        buf = pack(layout, grads, (loss,), xp=xp, dtype=dtype)  # (size,)
    world.allreduce_mean(buf)
    mean_grads, (mean_loss,) = unpack(layout, buf)
    return mean_loss, mean_grads


def broadcast_state(world, params: dict, m: dict, v: dict, xp=np):
    """Every rank's params and AdamW moments <- rank 0's, with one Bcast; returns the new (params, m, v)."""
    both = {**{f"p/{k}": a for k, a in params.items()}, **{f"m/{k}": a for k, a in m.items()},
            **{f"v/{k}": a for k, a in v.items()}}
    layout = flat_layout(both, extra=0)
    buf = world.bcast_(pack(layout, both, (), xp=xp))
    got, _ = unpack(layout, buf)
    split = [{k: got[f"{g}/{k}"].copy() for k in params} for g in ("p", "m", "v")]
    return split[0], split[1], split[2]


def digest(params: dict) -> str:
    """sha256 of the parameters' bytes in sorted key order: ranks in step hold the same digest."""
    h = hashlib.sha256()
    for k in sorted(params):
        a = params[k]
        h.update(np.ascontiguousarray(to_numpy(a)).tobytes())
    return h.hexdigest()


def check_in_step(world, params: dict, step: int):
    """Raise on every rank when the ranks' parameters differ (an MPI whose reduction results differ per rank)."""
    digests = world.allgather(digest(params))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"at step {step} the parameters of ranks {differ} differ from rank 0's: the MPI library "
                           f"returned different Allreduce results on different ranks. Use MPICH from the dist "
                           f"extra, or report the MPI library and its version")


@contextlib.contextmanager
def agree(world):
    """Run the block on every rank; when it raises on any rank, raise on all of them, with that rank's reason.

    Setting up can fail on one rank only (a corpus or last.ckpt missing on one machine); the others must not go on
    to wait for it in the first collective.
    """
    if world.size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:
        error = e
    messages = world.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} could not start, so neither can this one: {message}")


def on_root(world, fn):
    """Run ``fn()`` on rank 0 only; every rank returns its result, or raises when it failed there.

    Rank 0's evaluation and checkpoint writes can fail (a full disk) where the other ranks cannot see it: without
    this they would wait for it forever in the next collective.
    """
    if world.size == 1:
        return fn()
    result, error = None, None
    if world.rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    result, message = world.bcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 stopped the run: {message}")
    return result
