"""Generation (minirwkv/generate.py): streaming text never splits a UTF-8 character, stop strings cut the output,
greedy generation equals the reference RNN loop, a batch equals its prompts alone, a saved state continues
identically, and ``minirwkv sample`` runs end to end."""
import argparse

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minirwkv import ModelConfig, init_params, prefill, rnn_step
from minirwkv.engine.generate import (Detokenizer, StopFilter, add_sample_arguments, generate, generate_text,
                               run_sample)
from minirwkv.testing import assert_close
from minirwkv.tokenizers.core import ByteTokenizer

CONFIGS = {  # one tiny model per generation; RWKV-5/6 with H = 2 heads of N = 4
    "4": ModelConfig(vocab_size=256, n_embd=8, n_layer=1, dim_ffn=16),
    "5": ModelConfig(vocab_size=256, n_embd=8, n_layer=1, dim_ffn=16, version="5", head_size=4),
    "6": ModelConfig(vocab_size=256, n_embd=8, n_layer=1, dim_ffn=16, version="6", head_size=4, d_mix_lora=4,
                     d_decay_lora=4),
}
TOK = ByteTokenizer()


def _params(config, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0.0, 0.8, v.shape)).astype(np.float32)
            for k, v in init_params(config, seed=seed, dtype=np.float64).items()}


PARAMS_OF = {version: _params(config) for version, config in CONFIGS.items()}
PARAMS = PARAMS_OF["4"]  # for the tests of arguments and files, where the generation does not matter


@pytest.fixture(params=sorted(CONFIGS), ids=lambda v: f"v{v}")
def params(request):
    """The generation-dependent tests run on every generation: generate only sees logits and an opaque state."""
    return PARAMS_OF[request.param]


@given(text=st.text(max_size=30))
@example(text="a€b😀")
def test_detokenizer_streams_whole_characters(text):
    detok = Detokenizer(TOK)
    pieces = [detok.push(t) for t in TOK.encode(text)]
    pieces.append(detok.finish())
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_finish_shows_a_cut_character():
    detok = Detokenizer(TOK)
    assert detok.push(0xE2) == "" and detok.push(0x82) == ""  # the first two bytes of the euro sign
    assert detok.finish() == "\ufffd"


@given(text=st.text(alphabet="ab\nxyz", max_size=30), stops=st.lists(st.text(alphabet="ab\nx", min_size=1,
                                                                              max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
@example(text="hello\n\nworld", stops=["\n\n"], cuts=[5, 6])
@example(text="\naa", stops=["a", "\naa"], cuts=[2])  # a later short stop must wait for an earlier long one
def test_stop_filter_cuts_before_the_first_stop_string(text, stops, cuts):
    f = StopFilter(stops)
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    out = "".join(f.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + f.finish()
    hits = [text.find(s) for s in stops if s in text]
    assert out == (text[:min(hits)] if hits else text)
    assert f.stopped == bool(hits)


def reference_greedy(params, prompt_ids, n):
    """Greedy continuation with the readable reference: prefill + rnn_step + argmax."""
    logits, state = prefill(params, np.asarray([prompt_ids]), impl="numpy")
    logits, out = logits[:, -1], []
    for _ in range(n):
        t = int(logits[0].argmax())
        out.append(t)
        logits, state = rnn_step(params, np.array([t]), state)
    return out


def test_greedy_equals_the_reference_loop(params):
    n = 12
    got = generate_text(params, TOK, "Hi there", n, temperature=0)[0]
    want = TOK.decode(reference_greedy(params, TOK.encode("Hi there"), n))
    assert got == want


def test_a_batch_equals_its_prompts_alone(params):
    prompts = ["abc", "a much longer prompt", "x"]
    together = generate_text(params, TOK, prompts, 10, temperature=0, chunk_size=4)
    alone = [generate_text(params, TOK, p, 10, temperature=0)[0] for p in prompts]
    assert together == alone


def test_fixed_seed_repeats_and_sampling_options_apply(params):
    kw = dict(temperature=1.3, top_k=50, top_p=0.95, presence_penalty=0.3, frequency_penalty=0.1)
    a = generate_text(params, TOK, ["one", "two"], 20, seed=3, **kw)
    b = generate_text(params, TOK, ["one", "two"], 20, seed=3, **kw)
    c = generate_text(params, TOK, ["one", "two"], 20, seed=4, **kw)
    assert a == b and a != c


def test_stop_string_and_stop_token_end_a_sequence(params):
    ids = reference_greedy(params, TOK.encode("Hi"), 30)
    full = generate_text(params, TOK, "Hi", 30, temperature=0)[0]
    assert full == TOK.decode(ids)
    stop = full[5:7]
    cut = generate_text(params, TOK, "Hi", 30, temperature=0, stop=[stop])[0]
    assert cut == full[:full.find(stop)]
    by_token = generate_text(params, TOK, "Hi", 30, temperature=0, stop_tokens=[ids[3]])[0]
    assert by_token == TOK.decode(ids[:ids.index(ids[3])])


def test_max_new_tokens_bounds_the_output(params):
    pieces = list(generate(params, TOK, ["a", "b"], 7, seed=0))
    for i in range(2):
        text = "".join(p.text for p in pieces if p.index == i)
        assert len(TOK.encode(text.replace("\ufffd", "?"))) <= 7
    assert list(generate(params, TOK, "a", 0)) == []


def test_continuing_a_saved_state_equals_the_whole_prompt(params):
    from minirwkv.engine.infer import RNNRunner

    runner = RNNRunner(params)
    logits = runner.prefill([TOK.encode("Once upon")])
    state = runner.get_state()
    whole = generate_text(params, TOK, "Once upon a time", 15, seed=1)
    continued = generate_text(params, TOK, " a time", 15, seed=1, state=state)
    assert continued == whole
    from_logits = generate_text(params, TOK, ["", ""], 15, seed=2, state=state, logits=logits)
    assert from_logits == generate_text(params, TOK, ["Once upon"] * 2, 15, seed=2)
    with pytest.raises(ValueError, match="logits"):
        generate_text(params, TOK, "", 5, state=state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        generate_text(PARAMS, TOK, "a", 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate_text(PARAMS, TOK, "a", 5, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(PARAMS, TOK, "a", -1)
    with pytest.raises(ValueError, match="prompts"):
        generate_text(PARAMS, TOK, [], 5)


# --- minirwkv sample ----------------------------------------------------------------------------------------------

def _args(*argv):
    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    return parser.parse_args(list(argv))


def test_sample_command_streams_and_reuses_a_saved_state(tmp_path, capsys, params):
    from minirwkv.io.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(ckpt, params, meta={"tokenizer": TOK.spec()})
    common = ["--checkpoint", str(ckpt), "--max_new_tokens", "12", "--seed", "5"]
    assert run_sample(_args(*common, "--prompt", "Hello", "--state_out", str(tmp_path / "s.npz"))) == 0
    first = capsys.readouterr().out
    assert first.startswith("Hello")
    assert run_sample(_args(*common, "--state_in", str(tmp_path / "s.npz"))) == 0
    assert "Hello" + capsys.readouterr().out == first  # same continuation, from the saved state
    assert run_sample(_args(*common, "--prompt", "a", "--prompt", "bc", "--stop", "zzz")) == 0
    out = capsys.readouterr().out
    assert "--- [0] ---\na" in out and "--- [1] ---\nbc" in out


def test_sample_command_errors_are_clear(tmp_path, capsys):
    from pathlib import Path

    pth = Path(__file__).parents[1] / "fixtures" / "rwkv4_tiny_fp32.pth"
    if pth.exists():
        assert run_sample(_args("--checkpoint", str(pth), "--max_new_tokens", "3")) == 1
        assert "--tokenizer" in capsys.readouterr().err
    assert run_sample(_args("--checkpoint", str(tmp_path / "missing.ckpt"))) == 1
    assert "error" in capsys.readouterr().err
    assert run_sample(_args("--checkpoint", "x", "--top_k", "-2")) == 1
    assert "top_k" in capsys.readouterr().err


def test_reference_runner_samples_what_the_fast_runner_samples(params):
    """ReferenceRunner (the library's prefill / rnn_step, which also run on CuPy arrays) and RNNRunner give the same
    greedy continuation and the same logits, prompts of different lengths in one batch."""
    from minirwkv.engine.infer import ReferenceRunner, RNNRunner

    prompts = ["ab", "hello there", "x"]
    fast = generate_text(params, TOK, prompts, 12, temperature=0.0, runner=RNNRunner(params, len(prompts)))
    ref = generate_text(params, TOK, prompts, 12, temperature=0.0,
                        runner=ReferenceRunner(params, len(prompts), impl="numpy"))
    assert ref == fast
    a, b = RNNRunner(params, 2), ReferenceRunner(params, 2, impl="numpy")
    ids = [TOK.encode("abc"), TOK.encode("hello")]
    assert_close(b.prefill(ids), a.prefill(ids), params["emb.weight"].dtype, what="prefill logits")
    assert_close(b.step(np.array([1, 2])), a.step(np.array([1, 2])), params["emb.weight"].dtype, what="step logits")


def test_sample_on_cuda_without_a_gpu_fails_clearly(tmp_path, capsys):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: the error path cannot be reached")
    except ImportError:
        pass
    from minirwkv.io.checkpoint import save_checkpoint

    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, PARAMS, meta={"tokenizer": TOK.spec()})
    assert run_sample(_args("--checkpoint", str(ckpt), "--device", "cuda", "--max_new_tokens", "2")) == 1
    assert "pip install 'minirwkv[gpu]'" in capsys.readouterr().err


def test_load_model_names_a_folder_or_a_missing_file_and_what_to_pass(tmp_path):
    from minirwkv.engine.generate import load_model
    from minirwkv.io.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match=rf"--checkpoint {tmp_path}: is a folder; pass a checkpoint file such as "
                                         rf"{tmp_path}/best.ckpt$"):
        load_model(tmp_path)
    save_checkpoint(tmp_path / "last.ckpt", PARAMS, meta={"tokenizer": TOK.spec()})
    with pytest.raises(ValueError, match=r"such as .*/last.ckpt$"):  # the checkpoint that is there
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"best.ckpt: no such file; pass a checkpoint file; `minirwkv train` writes"):
        load_model(tmp_path / "best.ckpt")
    assert load_model(tmp_path / "last.ckpt")[1].name == "byte"


def test_sample_options_are_checked_before_any_file(tmp_path, capsys):
    from minirwkv.engine.generate import check_sample_options

    assert check_sample_options(_args("--temperature", "0", "--top_k", "3")).greedy
    for argv, key in [(["--temperature", "nan"], "temperature"), (["--top_p", "inf"], "top_p"),
                      (["--presence_penalty", "nan"], "presence_penalty"), (["--seed", "-3"], "seed"),
                      (["--chunk_size", "-1"], "chunk_size")]:
        with pytest.raises(ValueError, match=key):
            check_sample_options(_args(*argv))
        state = tmp_path / "new" / "s.npz"
        assert run_sample(_args(*argv, "--checkpoint", str(tmp_path), "--state_out", str(state))) == 1
        assert key in capsys.readouterr().err and not state.parent.exists()  # nothing read, nothing made
