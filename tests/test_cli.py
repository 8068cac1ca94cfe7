"""The minirwkv command (minirwkv/cli.py): configuration, end-to-end train then sample, and clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minirwkv import cli
from minirwkv.io.checkpoint import load_checkpoint, save_checkpoint
from minirwkv.config import TrainConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
TINY = ["--n_layer=1", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=1", "--plot=false",
        "--impl=numba"]


def test_overrides_and_toml_in_order(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('n_layer = 5\nlearning_rate = 1e-3\ndata = "x.txt"\nl2wrap = false\n')
    config = cli.train_config(["--config", str(toml), "--n_layer=2", "--resume"])
    assert (config.n_layer, config.learning_rate, config.data, config.l2wrap, config.resume) == \
        (2, 1e-3, "x.txt", False, True)  # the command line wins over the file, the file over the defaults
    assert cli.train_config([f"--config={toml}"]).n_layer == 5


def test_unknown_key_and_bad_arguments_fail_clearly(tmp_path, capsys):
    assert cli.main(["train", "--n_head=4"]) == 1
    err = capsys.readouterr().err
    assert "unknown configuration key 'n_head'" in err and "valid keys:" in err and "block_size" in err
    assert cli.main(["train", "--n_layer", "4"]) == 1
    assert "write options as --key=value" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layer = [")
    assert cli.main(["train", "--config", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["train", "--data=" + str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_are_valid_configs(recipe):
    config = cli.train_config(["--config", str(recipe)])
    assert isinstance(config, TrainConfig)


def test_train_then_sample_end_to_end(tmp_path):
    """``python -m minirwkv train`` in a fresh process, then ``sample`` from its checkpoint."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello python. " * 40)
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "minirwkv", "train", f"--data={corpus}", f"--out_dir={tmp_path}/o",
                          "--max_iters=20", "--eval_interval=10", "--sample_tokens=20", *TINY],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "step 20: val loss" in run.stdout and "--- sample (20 tokens" in run.stdout
    assert (tmp_path / "o" / "run_config.json").exists()
    sample = subprocess.run([sys.executable, "-m", "minirwkv", "sample", "--checkpoint", f"{tmp_path}/o/best.ckpt",
                             "--prompt", "hello", "--max-new-tokens", "30", "--seed", "1"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("hello") and len(sample.stdout) > len("hello")


def test_sample_refuses_mismatched_and_corrupt_checkpoints(tmp_path, capsys):
    from minirwkv.config import ModelConfig
    from minirwkv import init_params

    params = init_params(ModelConfig(vocab_size=200, n_embd=8, n_layer=1))  # fewer rows than the byte tokenizer
    save_checkpoint(tmp_path / "mixed.ckpt", params, meta={"tokenizer": {"name": "byte", "vocab_size": 256}})
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "mixed.ckpt")]) == 1
    assert "has 256 tokens but the model only 200" in capsys.readouterr().err
    save_checkpoint(tmp_path / "bare.ckpt", params)
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "bare.ckpt")]) == 1
    assert "carries no tokenizer" in capsys.readouterr().err
    data = (tmp_path / "mixed.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "cut.ckpt")]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "mixed.ckpt").params.keys() == params.keys()


def test_unknown_command(capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_plot_draws_a_png_or_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from minirwkv import plot

    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "eval", "step": 0, "elapsed": 1.0, "val_loss": 5.0}\n'
                   '{"kind": "train", "step": 10, "elapsed": 2.0, "loss": 3.0, "lr": 0.001}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'minirwkv\[plot\]'"):
        plot.plot_log(log)
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "needs matplotlib" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
