"""The minirwkv command (minirwkv/cli.py): configuration, end-to-end train then sample, and clear errors."""
import argparse
import dataclasses
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
    assert cli.main(["train", "n_layer=4"]) == 1
    assert "unexpected argument 'n_layer=4': write options as --key=value or --key value" in capsys.readouterr().err
    assert cli.main(["train", "--n_layer"]) == 1
    assert "--n_layer needs a value: --n_layer=VALUE or --n_layer VALUE" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layer = [")
    assert cli.main(["train", "--config", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["train", "--data=" + str(tmp_path / "missing.txt"), "--out_dir=" + str(tmp_path / "run")]) == 1
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
                             "--prompt", "hello", "--max_new_tokens", "30", "--seed", "1"],
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


# --- one convention for every command ----------------------------------------------------------------------------

def test_train_takes_both_spellings_and_both_forms():
    canonical = cli.train_config(["--n_layer=3", "--learning_rate=1e-3", "--plot=false", "--resume=true",
                                  "--dim_ffn=none", "--lr_final=0"])
    assert cli.train_config(["--n-layer", "3", "--learning-rate", "1e-3", "--plot", "false", "--resume",
                             "--dim-ffn", "none", "--lr_final", "0"]) == canonical
    assert (canonical.n_layer, canonical.plot, canonical.resume, canonical.dim_ffn) == (3, False, True, None)
    assert cli.train_config(["--resume", "--n_layer=2"]).resume  # a bare flag before another key


def test_train_help_describes_every_key_with_its_default(capsys):
    from minirwkv.config import RESUME_SAFE_KEYS, TRAIN_HELP

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for f in dataclasses.fields(TrainConfig):
        line = next(x for x in lines if x.strip().startswith(f"--{f.name}="))
        assert line.split()[0] == f"--{f.name}={cli.show(f.default)}" and TRAIN_HELP[f.name] in line
    resume_part = out[out.index("With --resume"):]
    assert all(key in resume_part for key in RESUME_SAFE_KEYS)
    assert "--block-size is --block_size" in out


PARSERS = {"sample": cli.sample_parser, "prepare": cli.prepare_parser, "plot": cli.plot_parser}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_help_names_its_defaults_and_speaks_underscores(command, capsys):
    parser = PARSERS[command]()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert all("-" not in o.lstrip("-") for o in action.option_strings), action.option_strings
        if not action.required and (action.option_strings or action.nargs == "?"):
            assert "default" in cli.DefaultsHelp("x")._get_help_string(action), action.dest
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and "default" in capsys.readouterr().out


def test_sample_help_names_its_default_checkpoint(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    assert "(default: out/best.ckpt)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command, hyphens, underscores", [
    ("sample", ["--max-new-tokens", "7", "--top-p=0.5", "--state-out", "s.npz", "--chunk-size=4"],
     ["--max_new_tokens=7", "--top_p", "0.5", "--state_out=s.npz", "--chunk_size", "4"]),
    ("prepare", ["--val-fraction=0.2", "--bpe-vocab-size", "300", "--out", "x"],
     ["--val_fraction", "0.2", "--bpe_vocab_size=300", "--out=x"]),
    ("plot", ["run", "--out", "a-b_c.png"], ["run", "--out=a-b_c.png"]),
])
def test_argparse_commands_take_both_spellings(command, hyphens, underscores):
    parse = PARSERS[command]().parse_args
    assert parse(cli.spell(hyphens)) == parse(cli.spell(underscores))
    assert cli.spell(["--top-p=a-b", "--", "--x-y"]) == ["--top_p=a-b", "--", "--x-y"]  # values stay as they are


def test_usage_mistakes_are_one_line_errors(capsys):
    assert cli.main(["sample", "--bogus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minirwkv sample: error: unrecognized arguments: --bogus") and err.count("\n") == 1
    assert "`minirwkv sample --help` lists the options" in err
    assert cli.main(["sample", "--max_new", "3"]) == 1  # no silent abbreviations
    assert "unrecognized arguments" in capsys.readouterr().err


# --- paths: a mistake is one line that names the path and the fix -----------------------------------------------

def _tiny_checkpoint(path):
    from minirwkv import init_params
    from minirwkv.config import ModelConfig

    save_checkpoint(path, init_params(ModelConfig(vocab_size=256, n_embd=8, n_layer=1)),
                    meta={"tokenizer": {"name": "byte", "vocab_size": 256}})
    return path


def _one_line_error(capsys, command):
    captured = capsys.readouterr()
    assert captured.err.startswith(f"minirwkv {command}: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def test_path_mistakes_are_one_line_errors(tmp_path, capsys):
    run = tmp_path / "out"
    run.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    ckpt = _tiny_checkpoint(tmp_path / "m.ckpt")
    cases = [
        (["sample", "--checkpoint", str(run)], f"--checkpoint {run}: is a folder; pass a checkpoint file such as "
                                               f"{run / 'best.ckpt'}"),
        (["sample", "--checkpoint", str(run / "best.ckpt")], "no such file; pass a checkpoint file; `minirwkv train` "
                                                             "writes out/best.ckpt"),
        (["sample", "--checkpoint", str(ckpt), "--state_in", str(tmp_path / "s.npz")],
         f"--state_in {tmp_path / 's.npz'}: no such file; pass a state file; write one with --state_out"),
        (["sample", "--checkpoint", str(ckpt), "--state_in", str(run)], "is a folder; pass a state file such as"),
        (["sample", "--checkpoint", str(ckpt), "--state_out", str(run)],
         f"--state_out {run}: is a folder; pass a file path such as {run / 'state.npz'}"),
        (["sample", "--checkpoint", str(ckpt), "--state_out", str(a_file / "s.npz")],
         f"{a_file} is a file, not a folder; choose another path"),
        (["prepare", "--data", str(a_file), "--out", str(a_file)],
         f"--out {a_file}: is a file; prepare writes a folder"),
        (["plot", str(tmp_path / "nothere")], "no such log; pass a run folder"),
        (["plot", str(run)], f"{run / 'log.jsonl'}: no such log"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        assert message in _one_line_error(capsys, argv[0]), argv
    assert a_file.read_text() == "mine" and list(run.iterdir()) == []  # nothing was touched


def test_plot_out_is_checked_and_its_folders_made(tmp_path, capsys, monkeypatch):
    from minirwkv.tools import plot

    (tmp_path / "log.jsonl").write_text('{"kind": "eval", "step": 0, "elapsed": 1.0, "val_loss": 5.0}\n')
    drawn = []
    monkeypatch.setattr(plot, "plot_log", lambda log, out=None: drawn.append(out) or str(out))
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert f"--out {tmp_path}: is a folder; pass a file path such as {tmp_path / 'loss.png'}" in \
        _one_line_error(capsys, "plot")
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "figs" / "run1" / "loss.png")]) == 0
    assert (tmp_path / "figs" / "run1").is_dir() and drawn == [str(tmp_path / "figs" / "run1" / "loss.png")]


def test_sample_state_out_makes_its_folders(tmp_path, capsys):
    from minirwkv.engine.infer import load_state

    ckpt = _tiny_checkpoint(tmp_path / "m.ckpt")
    state = tmp_path / "states" / "a" / "hello.npz"
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", "hi", "--max_new_tokens=2",
                     "--state-out", str(state)]) == 0
    assert load_state(state)[0].batch_size == 1
    capsys.readouterr()


def test_an_unforeseen_os_error_is_one_line(monkeypatch, capsys):
    def denied(argv):
        raise PermissionError(13, "Permission denied", "/runs/x/loss.png")

    monkeypatch.setattr(cli, "cmd_plot", denied)
    assert cli.main(["plot"]) == 1
    assert "minirwkv plot: error: /runs/x/loss.png: Permission denied; check the path and its permissions" in \
        _one_line_error(capsys, "plot")


# --- numbers fail when parsed, before anything is read or written -------------------------------------------------

@pytest.mark.parametrize("flag, key", [("--learning_rate=nan", "learning_rate"),
                                       ("--learning-rate=inf", "learning_rate"), ("--beta2=1", "beta2"),
                                       ("--eps=0", "eps"), ("--max_seconds=-1", "max_seconds"),
                                       ("--grad_clip=nan", "grad_clip"), ("--weight_decay=-1", "weight_decay")])
def test_train_refuses_bad_numbers_before_touching_anything(tmp_path, capsys, monkeypatch, flag, key):
    import minirwkv.engine.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("train ran"))
    assert cli.main(["train", flag, f"--out_dir={tmp_path / 'run'}"]) == 1
    assert f"--{key} must be a finite number" in _one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, key", [("--temperature=nan", "temperature"), ("--temperature=inf", "temperature"),
                                       ("--temperature=-1", "temperature"), ("--top_p=nan", "top_p"),
                                       ("--top_p=0", "top_p"), ("--top_p=1.5", "top_p"), ("--top_k=-1", "top_k"),
                                       ("--presence_penalty=inf", "presence_penalty"),
                                       ("--frequency-penalty=nan", "frequency_penalty"),
                                       ("--max_new_tokens=-1", "max_new_tokens"), ("--seed=-1", "seed"),
                                       ("--chunk_size=0", "chunk_size")])
def test_sample_refuses_bad_numbers_before_reading_the_checkpoint(tmp_path, capsys, flag, key):
    assert cli.main(["sample", flag, "--checkpoint", str(tmp_path / "missing.ckpt")]) == 1
    err = _one_line_error(capsys, "sample")
    assert key in err and "no such file" not in err


def test_prepare_checks_as_train_does_and_keeps_a_dataset(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50)
    out = tmp_path / "data" / "c"
    assert cli.main(["prepare", "--data", str(corpus), "--out", str(out), "--val_fraction=nan"]) == 1
    assert "--val_fraction must be a finite number in (0, 1), got nan" in _one_line_error(capsys, "prepare")
    assert cli.main(["prepare", "--data", str(corpus), "--out", str(out), "--tokenizer", "hf"]) == 1
    assert "train and prepare use one of byte, char, bpe, gpt2" in _one_line_error(capsys, "prepare")
    assert not out.exists()
    assert cli.main(["prepare", "--data", str(corpus), "--out", str(out), "--tokenizer=char"]) == 0
    assert f"train with --data={out}" in capsys.readouterr().out
    assert cli.main(["prepare", "--data", str(corpus), "--out", str(out)]) == 1
    assert "already holds a prepared dataset" in _one_line_error(capsys, "prepare")
    assert cli.main(["prepare", "--data", str(corpus), "--out", str(out), "--overwrite"]) == 0
    assert cli.train_config([f"--data={out}"]).data == str(out)
