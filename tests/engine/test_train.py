"""The training loop (minirwkv/train.py): it learns, resumes bit-identically, survives Ctrl-C and NaN."""
import dataclasses

import numpy as np
import pytest

from minirwkv import train as train_module
from minirwkv.io.checkpoint import load_checkpoint
from minirwkv.config import TrainConfig
from minirwkv.engine.train import LAST, NonFiniteLoss, train

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
    real = train_module.loss_and_grads
    saved = {}

    def poisoned(params, idx, targets, **kw):
        loss, grads = real(params, idx, targets, **kw)
        if len(saved) == 1:  # the update after step 5: grads go NaN
            grads = {k: g * np.float32("nan") for k, g in grads.items()}
        return loss, grads

    def on_step(step, loss):
        if step == 5:  # last.ckpt was written by the evaluation at step 4
            saved["bytes"] = (tmp_path / "run" / LAST).read_bytes()

    monkeypatch.setattr(train_module, "loss_and_grads", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5 .*the last good checkpoint .* is untouched"):
        train(tiny(tmp_path, eval_interval=4), on_step=on_step, echo=quiet)
    assert (tmp_path / "run" / LAST).read_bytes() == saved["bytes"]


def test_resume_refuses_another_model_or_a_corrupt_checkpoint(tmp_path):
    train(tiny(tmp_path, max_iters=2), echo=quiet)
    with pytest.raises(ValueError, match="n_embd=32.*the config asks for n_layer=1, n_embd=16"):
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
    with pytest.raises(RuntimeError, match=r"--device cuda needs CuPy and an NVIDIA GPU.*minirwkv\[gpu\]"):
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
