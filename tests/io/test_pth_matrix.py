"""Loading RWKV-5.2 and RWKV-6.0 ``.pth`` files without torch: detection, shapes, values, conversion, logits.

The fixtures ``rwkv{5,6}_tiny_{fp32,fp16,bf16}.pth`` were written by torch (tests/fixtures/make_pth_fixtures.py):
minirwkv's init plus noise, in fp32, and torch's fp16 / bf16 rounding of the same tensors. The fp32 file is the
source: the fp16 and bf16 files must load as exactly the round-to-nearest-even of its values (computed here in
NumPy), and every loaded file must run. Tests that run torch itself are importorskipped.
"""
import pathlib

import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig
from minirwkv.generation import get_generation
from minirwkv.io.checkpoint import convert, load_checkpoint, load_params

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
GENERATIONS = {  # what make_pth_fixtures.MATRIX wrote
    "rwkv5": ModelConfig(vocab_size=11, n_embd=8, n_layer=2, dim_ffn=16, version="5", head_size=4),
    "rwkv6": ModelConfig(vocab_size=11, n_embd=8, n_layer=2, dim_ffn=16, version="6", head_size=4, d_mix_lora=2,
                         d_decay_lora=3),
}
TAGS = ["fp32", "fp16", "bf16"]
CASES = [(g, t) for g in GENERATIONS for t in TAGS]


def fixture(gen, tag):
    return FIXTURES / f"{gen}_tiny_{tag}.pth"


def round_fp16(a):
    return a.astype(np.float16).astype(np.float32)


def round_bf16(a):
    """float32 -> the nearest bfloat16 (ties to even), as float32: what torch's .to(torch.bfloat16) does."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).reshape(np.shape(a))


ROUND = {"fp32": lambda a: a, "fp16": round_fp16, "bf16": round_bf16}
REL = {"fp32": 0.0, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # half an ulp, relative


@pytest.fixture(scope="module")
def sources():
    return {g: load_params(fixture(g, "fp32")) for g in GENERATIONS}


def assert_same(actual: dict, expected: dict, what):
    assert set(actual) == set(expected), f"{what}: different keys"
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, f"{what} {k}: dtype {actual[k].dtype} != {expected[k].dtype}"
        assert actual[k].shape == expected[k].shape, f"{what} {k}: shape {actual[k].shape} != {expected[k].shape}"
        assert np.array_equal(actual[k], expected[k]), f"{what} {k}: values differ"


@pytest.mark.parametrize("gen,tag", CASES)
def test_detected_generation_config_and_shapes(gen, tag):
    params = load_params(fixture(gen, tag))
    config = minirwkv.config_from_params(params)
    assert config == GENERATIONS[gen], f"{gen} {tag}: read {config}"
    assert config.version == {"rwkv5": "5", "rwkv6": "6"}[gen]
    shapes = get_generation(config.version).param_shapes(config)
    assert set(params) == set(shapes)
    for k, s in shapes.items():
        assert params[k].shape == s, f"{k}: {params[k].shape} != {s}"
        assert params[k].dtype == np.float32
    assert minirwkv.api.check_params(params) == config
    as64 = load_params(fixture(gen, tag), dtype=np.float64)
    assert all(a.dtype == np.float64 for a in as64.values())
    assert all(np.array_equal(as64[k], params[k]) for k in params)  # float64 holds every fp32/fp16/bf16 exactly


@pytest.mark.parametrize("gen,tag", CASES)
def test_values_are_the_source_within_the_dtype_rounding(gen, tag, sources):
    params, source = load_params(fixture(gen, tag)), sources[gen]
    for k, src in source.items():
        assert np.array_equal(params[k], ROUND[tag](src)), f"{gen} {tag} {k}: not the rounding of the fp32 source"
        err = np.abs(params[k] - src)
        assert np.all(err <= REL[tag] * np.abs(src) + 1e-7 * (tag == "fp16")), f"{gen} {tag} {k}: error {err.max()}"
        if tag != "fp32":
            assert np.any(err > 0), f"{gen} {tag} {k}: no rounding at all: is this really a {tag} file?"
    assert np.abs(source["blocks.1.att.output.weight"]).min() > 0  # the noise reaches the matrices init zeroes


@pytest.mark.parametrize("gen,tag", CASES)
def test_values_equal_what_torch_reads(gen, tag):
    torch = pytest.importorskip("torch")
    sd = torch.load(fixture(gen, tag), map_location="cpu", weights_only=True)
    assert sd[next(iter(sd))].dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[tag]
    expected = {k: v.float().numpy() for k, v in sd.items()}
    assert_same(load_params(fixture(gen, tag)), expected, f"{gen} {tag}")
    assert list(load_params(fixture(gen, tag))) == list(sd), "the file's key order is kept"


@pytest.mark.parametrize("gen,tag", CASES)
def test_convert_round_trips_through_the_minirwkv_format(gen, tag, tmp_path):
    src = fixture(gen, tag)
    params = load_params(src)
    config = convert(src, tmp_path / "a.ckpt")
    assert config == GENERATIONS[gen]
    ckpt = load_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.meta["source_format"] == "torch" and ckpt.meta["converted_from"] == src.name
    assert_same(ckpt.params, params, f"{gen} {tag} checkpoint")
    assert_same(load_params(tmp_path / "a.ckpt"), params, f"{gen} {tag} load_params(checkpoint)")
    assert convert(tmp_path / "a.ckpt", tmp_path / "b.ckpt") == config  # minirwkv -> minirwkv
    assert_same(load_params(tmp_path / "b.ckpt"), params, f"{gen} {tag} second conversion")
    assert convert(src, tmp_path / "c.ckpt", dtype=np.float64) == config
    c = load_checkpoint(tmp_path / "c.ckpt").params
    assert_same(c, {k: v.astype(np.float64) for k, v in params.items()}, f"{gen} {tag} float64 checkpoint")


@pytest.mark.parametrize("gen,tag", CASES)
def test_logits_of_a_loaded_fixture_equal_logits_of_the_source(gen, tag, sources, tmp_path):
    """The loaded file runs, and computes exactly what its source values (rounded to the file's dtype) compute,
    also after a conversion; the rounding itself moves the logits only a little (measured: fp16 0.14% / 0.55%,
    bf16 0.6% / 6.9% of max|logits| for v5.2 / v6: the v6 decay LoRA feeds exp(-exp(.)), which amplifies bf16)."""
    config = GENERATIONS[gen]
    idx = np.random.default_rng(3).integers(0, config.vocab_size, (2, 7))
    params = load_params(fixture(gen, tag))
    source = {k: ROUND[tag](v) for k, v in sources[gen].items()}
    logits = minirwkv.forward(params, idx, impl="numpy")
    assert logits.shape == (2, 7, config.vocab_size) and np.all(np.isfinite(logits))
    assert np.array_equal(logits, minirwkv.forward(source, idx, impl="numpy"))
    convert(fixture(gen, tag), tmp_path / "m.ckpt")
    assert np.array_equal(minirwkv.forward(load_params(tmp_path / "m.ckpt"), idx, impl="numpy"), logits)
    exact = minirwkv.forward({k: v.astype(np.float64) for k, v in sources[gen].items()}, idx, impl="numpy")
    err = np.abs(logits - exact).max() / np.abs(exact).max()
    assert err <= {"fp32": 1e-5, "fp16": 2e-2, "bf16": 0.2}[tag], f"{gen} {tag}: logits moved by {err:.2e}"


@pytest.mark.parametrize("gen", GENERATIONS)
def test_logits_of_the_fp32_fixture_equal_those_of_the_tensors_torch_reads(gen):
    torch = pytest.importorskip("torch")
    sd = torch.load(fixture(gen, "fp32"), map_location="cpu", weights_only=True)
    config = GENERATIONS[gen]
    idx = np.random.default_rng(4).integers(0, config.vocab_size, (1, 9))
    expected = minirwkv.forward({k: v.numpy() for k, v in sd.items()}, idx, impl="numpy")
    assert np.array_equal(minirwkv.forward(load_params(fixture(gen, "fp32")), idx, impl="numpy"), expected)
