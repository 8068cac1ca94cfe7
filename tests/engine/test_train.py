"""The training loop (minirwkv/train.py): it learns, resumes bit-identically, survives Ctrl-C and NaN."""
import dataclasses

import numpy as np
import pytest

from minirwkv import ModelConfig, init_params
from minirwkv.api import Model, config_from_params
from minirwkv.engine.generate import generate_text, load_model
from minirwkv.engine import train as train_module
from minirwkv.io.checkpoint import load_checkpoint
from minirwkv.config import TrainConfig
from minirwkv.engine.train import LAST, NonFiniteLoss, train
from minirwkv.tools.plot import read_log

TEXT = "".join(f"the {a} {b} sat on the mat. " for a in ("cat", "dog", "fox") for b in ("red", "big", "old")) * 12


def tiny(tmp_path, **overrides) -> TrainConfig:
    corpus = tmp_path / "tiny.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), n_layer=1, n_embd=32, block_size=32,
                         batch_size=8, learning_rate=1e-2, lr_final=1e-3, warmup_iters=5, max_iters=60,
                         eval_interval=20, eval_iters=2, log_interval=10, plot=False, impl="numba")
    return dataclasses.replace(config, **overrides)


def quiet(*args):
    pass


def test_smoke_loss_falls_below_threshold(tmp_path):
    result = train(tiny(tmp_path), echo=quiet)
    # uniform over 256 bytes is ln 256 = 5.55 nats, this corpus's unigram entropy 2.48; a model that learned the
    # words and their order gets far below both in 60 steps (measured: 0.15)
    assert result.val_loss < 1.0, result.val_loss
    assert result.step == 60 and not result.interrupted
    records = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert '"kind": "eval", "step": 0' in records[0] and '"elapsed"' in records[0]
    meta = load_checkpoint(tmp_path / "run" / LAST).meta
    assert meta["step"] == 60 and meta["backend"] == "numba" and meta["tokenizer"] == {"name": "byte",
                                                                                       "vocab_size": 256}
    assert (tmp_path / "run" / "best.ckpt").exists() and (tmp_path / "run" / "run_config.json").exists()


def interrupt_at(k):
    def on_step(step, loss):
        if step == k:
            raise KeyboardInterrupt

    return on_step


def test_resume_is_bit_identical(tmp_path):
    whole = train(tiny(tmp_path / "a", max_iters=12, eval_interval=5), echo=quiet)
    first = train(tiny(tmp_path / "b", max_iters=12, eval_interval=5), on_step=interrupt_at(7), echo=quiet)
    assert first.interrupted and first.step == 7
    assert load_checkpoint(tmp_path / "b" / "run" / LAST).meta["step"] == 7  # Ctrl-C saved last
    resumed = train(tiny(tmp_path / "b", max_iters=12, eval_interval=5, resume=True), echo=quiet)
    assert resumed.step == 12
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k], err_msg=k)
    a = load_checkpoint(tmp_path / "a" / "run" / LAST)
    b = load_checkpoint(tmp_path / "b" / "run" / LAST)
    for group in ("adam_m", "adam_v"):
        for k in a.arrays[group]:
            np.testing.assert_array_equal(b.arrays[group][k], a.arrays[group][k], err_msg=f"{group} {k}")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = Model.loss_and_grads
    saved = {}

    def poisoned(self, params, idx, targets, **kw):
        loss, grads = real(self, params, idx, targets, **kw)
        if len(saved) == 1:  # the update after step 5: grads go NaN
            grads = {k: g * np.float32("nan") for k, g in grads.items()}
        return loss, grads

    def on_step(step, loss):
        if step == 5:  # last.ckpt was written by the evaluation at step 4
            saved["bytes"] = (tmp_path / "run" / LAST).read_bytes()

    monkeypatch.setattr(Model, "loss_and_grads", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5 .*the last good checkpoint .* is untouched"):
        train(tiny(tmp_path, eval_interval=4), on_step=on_step, echo=quiet)
    assert (tmp_path / "run" / LAST).read_bytes() == saved["bytes"]


def test_resume_refuses_another_model_or_a_corrupt_checkpoint(tmp_path):
    train(tiny(tmp_path, max_iters=2), echo=quiet)
    with pytest.raises(ValueError, match=r"settings differ from it: n_embd \(saved 32, given 16\)"):
        train(tiny(tmp_path, max_iters=4, n_embd=16, resume=True), echo=quiet)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    with pytest.raises(ValueError, match="trained on other text"):
        train(tiny(tmp_path, max_iters=4, data=str(other), resume=True), echo=quiet)
    last = tmp_path / "run" / LAST
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk without atomic writes
    with pytest.raises(ValueError, match="cannot resume from .*last.ckpt"):
        train(tiny(tmp_path, max_iters=4, resume=True), echo=quiet)
    with pytest.raises(ValueError, match="no .* to resume from"):
        train(tiny(tmp_path / "fresh", resume=True), echo=quiet)


def test_corpus_too_short_for_the_block(tmp_path):
    with pytest.raises(ValueError, match=r"the val split has \d+ tokens, fewer than block_size \+ 1 = 513"):
        train(tiny(tmp_path, block_size=512), echo=quiet)


def test_wall_clock_budget_stops_and_evaluates(tmp_path):
    result = train(tiny(tmp_path, max_iters=10_000, max_seconds=3.0), echo=quiet)
    assert 0 < result.step < 10_000 and result.val_loss is not None
    assert load_checkpoint(tmp_path / "run" / LAST).meta["step"] == result.step


def test_device_cuda_without_cupy_fails_clearly(tmp_path):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: the error path cannot be reached")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=r"device 'cuda' needs CuPy and an NVIDIA GPU.*minirwkv\[gpu\]"):
        train(tiny(tmp_path, device="cuda"), echo=quiet)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from minirwkv import checkpoint

    real = checkpoint._write_npy
    calls = {"saves": 0}

    def write_npy(zf, name, array, compress):
        if name == "params/emb.weight.npy":
            calls["saves"] += 1
            if calls["saves"] == 3:  # the third checkpoint write (the evaluation at step 4) hits a full disk
                saved["bytes"] = (tmp_path / "run" / LAST).read_bytes()
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(zf, name, array, compress)

    saved = {}
    monkeypatch.setattr(checkpoint, "_write_npy", write_npy)
    with pytest.raises(RuntimeError, match=r"could not save .*last.ckpt at step 4 \(No space left on device\); "
                                           r"the previous last.ckpt, if any, is untouched"):
        train(tiny(tmp_path, eval_interval=4), echo=quiet)
    assert (tmp_path / "run" / LAST).read_bytes() == saved["bytes"]
    assert load_checkpoint(tmp_path / "run" / LAST).meta["step"] == 0
    assert [p.name for p in (tmp_path / "run").glob(".*tmp")] == []  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------
# A run never destroys an earlier one; --resume continues the run that was saved
# ---------------------------------------------------------------------------------------------------------------

def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_second_run_into_a_used_out_dir_refuses_and_touches_nothing(tmp_path):
    train(tiny(tmp_path, max_iters=4, eval_interval=2), echo=quiet)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds a run \(last.ckpt, best.ckpt\); continue it with "
                                         r"--resume=true, start a new one with another --out_dir, or replace it "
                                         r"with --overwrite=true"):
        train(tiny(tmp_path, max_iters=2, n_layer=2), echo=quiet)
    assert snapshot(tmp_path / "run") == before


def test_overwrite_replaces_the_run_and_starts_a_new_log(tmp_path):
    train(tiny(tmp_path, max_iters=6, eval_interval=2, log_interval=1), echo=quiet)
    train(tiny(tmp_path, max_iters=2, eval_interval=2, log_interval=1, overwrite=True), echo=quiet)
    steps = [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "best.ckpt").meta["step"] <= 2


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ValueError, match=r"--out_dir .*taken is a file, not a folder"):
        train(tiny(tmp_path, out_dir=str(tmp_path / "taken")), echo=quiet)
    assert (tmp_path / "taken").read_text() == "mine"


def test_resume_takes_the_saved_configuration(tmp_path):
    """Flags not repeated on resume come from the checkpoint, not from TrainConfig's defaults, and the run is
    bit-identical to one that never stopped."""
    setup = dict(max_iters=10, eval_interval=5, learning_rate=5e-3, batch_size=4, block_size=16)
    whole = train(tiny(tmp_path / "a", **setup), echo=quiet)
    train(tiny(tmp_path / "b", **setup), on_step=interrupt_at(6), echo=quiet)
    plain = TrainConfig(out_dir=str(tmp_path / "b" / "run"), resume=True, plot=False)  # nothing repeated
    resumed = train(plain, echo=quiet)
    saved = load_checkpoint(tmp_path / "b" / "run" / LAST).meta["train"]
    assert (saved["learning_rate"], saved["batch_size"], saved["block_size"]) == (5e-3, 4, 16)
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k], err_msg=k)


def test_resume_refuses_a_different_setting_and_names_both_values(tmp_path):
    train(tiny(tmp_path, max_iters=4, eval_interval=2), echo=quiet)
    with pytest.raises(ValueError, match=r"learning_rate \(saved 0.01, given 0.002\), n_layer \(saved 1, given 2\)"):
        train(tiny(tmp_path, resume=True, learning_rate=2e-3, n_layer=2), echo=quiet,
              explicit={"learning_rate", "n_layer", "resume"})


def test_a_new_max_iters_on_resume_is_allowed_and_announced(tmp_path):
    train(tiny(tmp_path, max_iters=4, eval_interval=2), echo=quiet)
    lines = []
    result = train(tiny(tmp_path, resume=True, max_iters=6), echo=lines.append, explicit={"resume", "max_iters"})
    assert result.step == 6
    assert any("max_iters changed from 4 to 6" in x and "no longer bit-identical" in x for x in lines), lines


def test_resumed_log_reads_as_one_run_and_a_torn_line_is_dropped(tmp_path):
    config = tiny(tmp_path, max_iters=12, eval_interval=5, log_interval=1)
    train(config, on_step=interrupt_at(7), echo=quiet)  # last.ckpt at step 7
    log = tmp_path / "run" / "log.jsonl"
    with open(log, "a") as f:  # a segment that ran past its checkpoint, then a write torn by a full disk
        f.write('{"kind": "train", "step": 8, "elapsed": 1.0, "loss": 9.0}\n{"kind": "train", "st')
    train(dataclasses.replace(config, resume=True), echo=quiet)
    with pytest.warns(UserWarning, match=r"log.jsonl: line \d+ is not whole JSON"):
        records = read_log(log)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # one run: each step once, the stale step 8 replaced
    assert all(r["loss"] != 9.0 for r in records if r["kind"] == "train")
    assert '"kind": "train", "st\n' in log.read_text()  # the writer started a new line after the torn one


def test_orphan_temps_of_a_killed_write_are_removed_on_the_next_run(tmp_path):
    config = tiny(tmp_path, max_iters=2, eval_interval=2)
    train(config, echo=quiet)
    dead = 2**22 + 12345  # above the default pid_max of Linux: no such process
    orphan = tmp_path / "run" / f".last.ckpt.{dead}.0123abcd.tmp"
    orphan.write_bytes(b"half a checkpoint")
    mine = tmp_path / "run" / "notes.tmp"
    mine.write_text("not ours")
    train(dataclasses.replace(config, resume=True, max_iters=3), echo=quiet, explicit={"resume", "max_iters"})
    assert not orphan.exists() and mine.exists()


def test_resume_keeps_best_val(tmp_path, monkeypatch):
    """best.ckpt is replaced only by a better model: a resumed run compares with the saved best_val."""
    config = tiny(tmp_path, max_iters=8, eval_interval=4)
    train(config, on_step=interrupt_at(5), echo=quiet)
    best = (tmp_path / "run" / "best.ckpt").read_bytes()
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: 50.0)  # every later evaluation is worse
    result = train(dataclasses.replace(config, resume=True), echo=quiet)
    assert (tmp_path / "run" / "best.ckpt").read_bytes() == best
    assert result.best_val < 50.0


class FakeClock:
    """time.perf_counter for the trainer: advances ``tick`` seconds at every reading."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_resume_keeps_the_elapsed_time_and_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module.time, "perf_counter", FakeClock(0.5))
    config = tiny(tmp_path, max_iters=20, eval_interval=10)
    first = train(config, on_step=interrupt_at(8), echo=quiet)
    assert first.elapsed > 0
    second = train(dataclasses.replace(config, resume=True, max_iters=10), echo=quiet,
                   explicit={"resume", "max_iters"})
    assert second.elapsed > first.elapsed  # the clock of the whole run, not of the last segment
    # a budget that the first segment already spent: the resumed run stops at once, where it started
    budget = dataclasses.replace(config, resume=True, max_iters=20, max_seconds=first.elapsed)
    third = train(budget, echo=quiet, explicit={"resume", "max_iters", "max_seconds"})
    assert third.step == second.step


def test_the_learning_rate_follows_the_clock_under_max_seconds(tmp_path, monkeypatch):
    """With max_seconds the schedule's progress is the share of the budget spent, read from the clock."""
    rates = []
    real = train_module.optim.adamw_step

    def recording(params, grads, state, lr, *args, **kwargs):
        rates.append(lr)
        return real(params, grads, state, lr, *args, **kwargs)

    monkeypatch.setattr(train_module.optim, "adamw_step", recording)
    runs = []
    for i, tick in enumerate((0.01, 0.2)):
        rates.clear()
        monkeypatch.setattr(train_module.time, "perf_counter", FakeClock(tick))
        train(tiny(tmp_path / str(i), max_iters=10_000, max_seconds=200.0, warmup_iters=0, eval_interval=1000),
              on_step=interrupt_at(6), echo=quiet)
        runs.append(list(rates))
    slow, fast = runs  # the same 6 steps; on the fast clock more of the budget is spent at each
    assert len(slow) == len(fast) == 6
    assert all(f < s for f, s in zip(fast[1:], slow[1:]))
    assert fast == sorted(fast, reverse=True)


def test_the_trainer_honours_l2wrap(tmp_path, monkeypatch):
    seen = []
    real = Model.loss_and_grads

    def recording(self, params, idx, targets, l2wrap=False):
        seen.append(l2wrap)
        return real(self, params, idx, targets, l2wrap)

    monkeypatch.setattr(Model, "loss_and_grads", recording)
    on = train(tiny(tmp_path / "on", max_iters=1, eval_interval=1, l2wrap=True), echo=quiet)
    off = train(tiny(tmp_path / "off", max_iters=1, eval_interval=1, l2wrap=False), echo=quiet)
    assert seen == [True, False]
    assert not np.array_equal(on.params["head.weight"], off.params["head.weight"])


# --- RWKV-5.2 and RWKV-6: the same trainer, checkpoints and resume --------------------------------------------------

@pytest.mark.parametrize("version", ["5", "6"])
def test_every_generation_learns_and_resumes_bit_identically(tmp_path, version):
    """`minirwkv train --version=5|6`: the loss falls, the checkpoint says which model it holds, and an interrupted
    run resumes to exactly the parameters and Adam moments of one that never stopped."""
    setup = dict(version=version, head_size=8, max_iters=12, eval_interval=5)  # H = 4 heads of N = 8
    whole = train(tiny(tmp_path / "a", **setup), echo=quiet)
    first = train(tiny(tmp_path / "b", **setup), on_step=interrupt_at(7), echo=quiet)
    assert first.interrupted and first.step == 7
    resumed = train(tiny(tmp_path / "b", resume=True, **setup), echo=quiet)
    assert resumed.step == 12 and resumed.val_loss < 4.0  # uniform over 256 bytes is ln 256 = 5.55 nats
    a, b = load_checkpoint(tmp_path / "a" / "run" / LAST), load_checkpoint(tmp_path / "b" / "run" / LAST)
    assert a.meta["model"]["version"] == version and a.meta["model"]["head_size"] == 8
    assert set(whole.params) == set(minirwkv_param_names(version))
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k], err_msg=k)
    for group in ("adam_m", "adam_v"):
        for k in a.arrays[group]:
            np.testing.assert_array_equal(b.arrays[group][k], a.arrays[group][k], err_msg=f"{group} {k}")
    params, tokenizer = load_model(tmp_path / "a" / "run" / LAST)  # the checkpoint samples as that generation
    assert config_from_params(params).version == version
    assert len(generate_text(params, tokenizer, "the ", 8, temperature=0)[0]) > 0


def minirwkv_param_names(version):
    return init_params(ModelConfig(vocab_size=256, n_embd=32, n_layer=1, version=version, head_size=8))


def test_resume_refuses_another_generation_or_head_size(tmp_path):
    train(tiny(tmp_path, version="6", head_size=8, max_iters=2, eval_interval=1), echo=quiet)
    with pytest.raises(ValueError, match=r"version \(saved '6', given '5'\)"):
        train(tiny(tmp_path, version="5", head_size=8, resume=True), echo=quiet, explicit={"version", "resume"})
    with pytest.raises(ValueError, match=r"head_size \(saved 8, given 16\)"):
        train(tiny(tmp_path, version="6", head_size=16, resume=True), echo=quiet, explicit={"head_size", "resume"})


def test_a_head_size_that_does_not_divide_n_embd_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"n_embd=32 .*head_size=12"):
        train(tiny(tmp_path, version="6", head_size=12), echo=quiet)
