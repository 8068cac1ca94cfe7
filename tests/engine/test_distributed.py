"""Data-parallel training over MPI (minirwkv/distributed.py, docs/distributed.md).

The first tests need no MPI: the flat buffer, one Allreduce per step counted on a fake communicator, how a run
decides whether it is distributed. The last ones launch ``mpiexec -n 2`` (the MPICH of the dist extra) on a tiny
model: two ranks == one process on the same global batch, checkpoints written by rank 0 alone, an interrupted and
resumed 2-rank run == an uninterrupted one, bit for bit.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minirwkv import ModelConfig, init_params
from minirwkv.io.checkpoint import load_checkpoint
from minirwkv.config import TrainConfig
from minirwkv.engine.data import get_batch
from minirwkv.engine.distributed import (INSTALL, MPIWorld, SingleProcess, average_gradients, flat_layout, init_world,
                                  on_root, pack, unpack)
from minirwkv.testing import assert_close
from minirwkv.engine.train import BEST, LAST, train

TEXT = "".join(f"the {a} {b} sat on the mat. " for a in ("cat", "dog", "fox") for b in ("red", "big", "old")) * 12


def tiny(tmp_path, **overrides) -> TrainConfig:
    corpus = tmp_path / "tiny.txt"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), n_layer=1, n_embd=32, block_size=32,
                         batch_size=8, learning_rate=1e-2, lr_final=1e-3, warmup_iters=2, max_iters=6,
                         eval_interval=3, eval_iters=2, log_interval=2, plot=False, impl="numba", sample_tokens=0)
    return dataclasses.replace(config, **overrides)


def quiet(*args):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Without MPI
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_unpack_round_trip_in_a_fixed_order(dtype):
    params = init_params(ModelConfig(vocab_size=11, n_embd=8, n_layer=2), seed=3, dtype=dtype)
    grads = {k: np.random.default_rng(i).standard_normal(a.shape).astype(dtype) for i, (k, a) in
             enumerate(params.items())}
    layout = flat_layout(grads)
    assert layout == flat_layout(dict(reversed(list(grads.items()))))  # insertion order does not matter
    buf = pack(layout, grads, (2.5,))
    assert buf.shape == (sum(a.size for a in grads.values()) + 1,) and buf.dtype == dtype
    back, (loss,) = unpack(layout, buf)
    assert loss == 2.5 and list(back) == sorted(grads)
    for k in grads:
        np.testing.assert_array_equal(back[k], grads[k], err_msg=k)
        assert np.shares_memory(back[k], buf), k  # views of the reduced buffer: no copy per tensor


class FakeComm:
    """The mpi4py methods training calls, for rank ``rank`` of ``size`` ranks that all hold this rank's arrays."""

    def __init__(self, size=2, rank=0, bcast_reply=None):
        self.size, self.rank, self.bcast_reply = size, rank, bcast_reply
        self.calls = {"Allreduce": [], "Bcast": 0, "bcast": 0, "allgather": 0}

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return self

    def Allreduce(self, sendbuf, recvbuf, op):
        assert sendbuf is FAKE_MPI.IN_PLACE and op is FAKE_MPI.SUM
        self.calls["Allreduce"].append((recvbuf.ndim, recvbuf.size, recvbuf.flags.c_contiguous))
        recvbuf *= self.size  # the sum over `size` identical ranks

    def Bcast(self, buf, root):
        self.calls["Bcast"] += 1

    def bcast(self, obj, root):
        self.calls["bcast"] += 1
        return obj if self.bcast_reply is None else self.bcast_reply

    def allgather(self, obj):
        self.calls["allgather"] += 1
        return [obj] * self.size


FAKE_MPI = SimpleNamespace(IN_PLACE=object(), SUM=object(), COMM_TYPE_SHARED=0)


def test_one_allreduce_of_one_flat_buffer_per_step(tmp_path):
    comm = FakeComm(size=2)
    result = train(tiny(tmp_path, max_iters=5), echo=quiet, world=MPIWorld(comm, FAKE_MPI))
    assert result.step == 5 and result.world_size == 2 and np.isfinite(result.val_loss)
    n = sum(a.size for a in result.params.values())
    assert comm.calls["Allreduce"] == [(1, n + 1, True)] * 5  # per step: one call, all gradients and the loss
    assert comm.calls["Bcast"] == 1  # rank 0's starting parameters and moments, once


def test_average_gradients_divides_the_sum_and_spreads_a_failed_forward():
    params = init_params(ModelConfig(vocab_size=7, n_embd=4, n_layer=1), seed=0)
    world, layout = MPIWorld(FakeComm(size=4), FAKE_MPI), flat_layout(params)
    loss, mean = average_gradients(world, layout, params, 1.5, dtype=np.float32)
    assert loss == 1.5
    for k in params:
        np.testing.assert_array_equal(mean[k], params[k], err_msg=k)  # 4 equal shares: their mean
    loss, mean = average_gradients(world, layout, None, float("nan"), dtype=np.float32)
    assert np.isnan(loss) and all(np.isnan(g).all() for g in mean.values())  # every rank stops at this step


def test_a_failure_on_rank_0_stops_the_other_ranks():
    world = MPIWorld(FakeComm(size=2, rank=1, bcast_reply=(None, "RuntimeError: could not save out/last.ckpt")),
                     FAKE_MPI)
    with pytest.raises(RuntimeError, match="rank 0 stopped the run: RuntimeError: could not save"):
        on_root(world, lambda: pytest.fail("rank 1 must not run rank 0's work"))


def test_the_ranks_shares_make_the_single_process_batch():
    tokens = np.arange(1000) % 251
    x, y = get_batch(tokens, 16, 12, seed=5, step=7)  # (12, 16)
    for n in (2, 3, 4):
        shares = [get_batch(tokens, 16, 12, seed=5, step=7, rank=r, world_size=n) for r in range(n)]
        np.testing.assert_array_equal(np.concatenate([s[0] for s in shares]), x)
        np.testing.assert_array_equal(np.concatenate([s[1] for s in shares]), y)
    with pytest.raises(ValueError, match=r"--batch_size=12 is the global batch, split evenly over 5 processes: "
                                         r"use a multiple of 5 \(e.g. 10 or 15\)"):
        get_batch(tokens, 16, 12, seed=5, step=7, rank=0, world_size=5)


def test_which_world(monkeypatch):
    assert isinstance(init_world("auto", environ={}), SingleProcess)
    assert isinstance(init_world("auto", environ={"PMI_SIZE": "1"}), SingleProcess)
    with pytest.raises(ValueError, match="--distributed=off, but this is one of 2 processes .*PMI_SIZE=2"):
        init_world("off", environ={"PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="--distributed must be one of auto, off, mpi"):
        init_world("nccl", environ={})
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(RuntimeError, match=r"one of 2 processes .*OMPI_COMM_WORLD_SIZE=2.* mpi4py cannot be "
                                           r"imported.*" + INSTALL.replace("[", r"\[").replace("]", r"\]")):
        init_world("auto", environ={"OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="--distributed=mpi was asked for, but mpi4py cannot be imported"):
        init_world("mpi", environ={})


def test_importing_minirwkv_does_not_import_mpi4py():
    code = ("import sys, minirwkv, minirwkv.engine.train, minirwkv.engine.distributed, minirwkv.cli; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PMI_SIZE": "2"}, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# Under mpiexec -n 2
# ---------------------------------------------------------------------------------------------------------------

SCRIPT = Path(__file__).parent / "mpi_scripts" / "train_ranks.py"
RANKS = 2


def mpiexec() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip(f"mpi4py is not installed: {INSTALL} (or the dev extra) to run the MPI tests")
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, matching the MPI mpi4py loads
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip(f"no mpiexec next to {sys.executable} or on PATH: {INSTALL} installs MPICH's")
    return found


def launch(jobs: list, folder: Path):
    """Run the jobs under ``mpiexec -n 2``; one thread per rank (2 ranks on 2 cores), and never hang CI."""
    path = folder / f"jobs{len(list(folder.glob('jobs*.json')))}.json"
    path.write_text(json.dumps(jobs))
    threads = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([mpiexec(), "-n", str(RANKS), sys.executable, str(SCRIPT), str(path)],
                          env={**os.environ, **threads}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"mpiexec failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def ranks(prefix: Path) -> list:
    """What each rank saved, read now (the next launch may overwrite the files)."""
    out = []
    for r in range(RANKS):
        with np.load(f"{prefix}.rank{r}.npz") as saved:
            out.append({k: saved[k] for k in saved.files})
    return out


def params_of(saved: dict) -> dict:
    return {k[len("param/"):]: a for k, a in saved.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-rank runs of 6 steps in float32 and float64, an RWKV-6 one, and a float32 one stopped by Ctrl-C at step 4
    then resumed."""
    mpiexec()
    folder = tmp_path_factory.mktemp("mpi")
    configs = {dtype: tiny(folder / dtype, dtype=dtype) for dtype in ("float32", "float64")}
    configs["v6"] = tiny(folder / "v6", dtype="float64", version="6", head_size=8)  # the same trainer for RWKV-6
    configs["resumed"] = tiny(folder / "resumed")
    jobs = [{"config": dataclasses.asdict(c), "save": str(folder / name)} for name, c in configs.items()]
    jobs[-1]["interrupt_at"] = 4
    launch(jobs, folder)
    first = ranks(folder / "resumed")
    launch([{"config": dataclasses.asdict(dataclasses.replace(configs["resumed"], resume=True)),
             "save": str(folder / "resumed")}], folder)
    return SimpleNamespace(folder=folder, configs=configs, first=first)


def train_losses(out_dir) -> np.ndarray:
    records = map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines())
    return np.array([r["loss"] for r in records if r["kind"] == "train"])


@pytest.mark.parametrize("name", ["float32", "float64", "v6"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(runs, name):
    # 2 ranks x 4 rows == 1 process x 8 rows: the same batches, the gradient summed in another order. After 6
    # AdamW steps the parameters agree per tensor to the dtype's "same" tolerance (measured, normwise: 8.7e-6 in
    # float32, 8.0e-14 in float64)
    config = runs.configs[name]
    dtype = config.dtype  # "v6" is RWKV-6 in float64
    single = train(dataclasses.replace(config, out_dir=str(runs.folder / f"single-{name}")), echo=quiet)
    rank0, rank1 = ranks(runs.folder / name)
    assert int(rank0["step"]) == int(rank1["step"]) == 6 and int(rank0["world_size"]) == RANKS
    for k, a in params_of(rank0).items():
        np.testing.assert_array_equal(params_of(rank1)[k], a, err_msg=f"ranks differ: {k}")  # identical updates
        assert a.dtype == np.dtype(dtype)
        assert_close(a, single.params[k], dtype, "same", what=k)
    assert_close(np.array(float(rank0["val_loss"])), np.array(single.val_loss), dtype, "same", what="val loss")
    # the logged training loss is the mean over the global batch too (Adam would hide a gradient off by a factor)
    assert_close(train_losses(config.out_dir), train_losses(single.out_dir), dtype, "same", what="training loss")


def test_rank_0_alone_writes_checkpoints_and_logs(runs):
    out = runs.folder / "float32" / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted([BEST, LAST, "log.jsonl", "run_config.json"])  # no temp
    saves = [int(r["saves"]) for r in ranks(runs.folder / "float32")]
    assert saves[1] == 0 and saves[0] >= 3  # last.ckpt at steps 0, 3, 6 and best.ckpt when val improved
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), ("train", 2), ("eval", 3), ("train", 4),
                                                         ("train", 6), ("eval", 6)]  # once each, not once a rank
    meta = load_checkpoint(out / LAST).meta
    assert meta["step"] == 6 and meta["world_size"] == RANKS


def test_a_resumed_two_rank_run_continues_bit_identically(runs):
    assert [int(r["step"]) for r in runs.first] == [4, 4] and all(bool(r["interrupted"]) for r in runs.first)
    whole, resumed = ranks(runs.folder / "float32"), ranks(runs.folder / "resumed")
    for r in range(RANKS):
        assert int(resumed[r]["step"]) == 6
        for k, a in params_of(whole[r]).items():
            np.testing.assert_array_equal(params_of(resumed[r])[k], a, err_msg=f"rank {r}: {k}")
    a = load_checkpoint(runs.folder / "float32" / "run" / LAST)
    b = load_checkpoint(runs.folder / "resumed" / "run" / LAST)
    for group in ("adam_m", "adam_v"):
        for k in a.arrays[group]:
            np.testing.assert_array_equal(b.arrays[group][k], a.arrays[group][k], err_msg=f"{group} {k}")
