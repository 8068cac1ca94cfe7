r"""Text generation: prompts in, text out piece by piece, for several prompts at once; and ``minirwkv sample``.

    for piece in generate(params, tokenizer, ["The cat", "Once upon"], max_new_tokens=50, temperature=0.8,
                          top_p=0.9, seed=0, stop=["\n\n"]):
        print(piece.index, piece.text)

How a batch runs (minirwkv/infer.py): the prompts are prefilled in parallel mode in blocks of ``chunk_size`` tokens
(prompts of equal length together), then all sequences step together in RNN mode, one token each per step; the
sampler (minirwkv/sampling.py) draws from one seeded generator. A finished sequence (stop string, stop token)
rides along until the others finish: its tokens are computed and discarded, which keeps the batch rectangular.

Streaming text. A token is a sequence of bytes, and a character of UTF-8 may be split across tokens (byte-level
vocabularies do this for every non-ASCII character). ``Detokenizer`` decodes a window of the tokens and emits new
text only when it does not end in U+FFFD, the replacement character that ``decode`` shows for an incomplete
character; the window restarts after every emitted piece, so the work per token stays constant.
Stop strings are searched in the text, not in the tokens (a stop string may span tokens): ``StopFilter`` holds back
the longest tail of the text that could still begin a stop string, and cuts the output right before the first one.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from typing import Iterator, NamedTuple

import numpy as np

from ..backends.threads import resolve_threads
from .infer import DEFAULT_CHUNK, ReferenceRunner, RNNRunner, broadcast_state, load_state, save_state
from .sampling import SamplingConfig, make_rng, sample
from ..devices import is_cupy
from ..paths import existing_file, output_file

REPLACEMENT = "\ufffd"  # what decode shows for bytes that are not (yet) a whole UTF-8 character


class Piece(NamedTuple):
    index: int  # which prompt this text continues
    text: str


class Detokenizer:
    """Text of a growing list of tokens, piece by piece, never cutting a UTF-8 character in two.

    Keeps two offsets into the tokens (as Hugging Face text-generation-inference does): ``prefix`` where the
    window decoded for context starts, ``read`` where the text already emitted ends. A tokenizer whose decode is
    not plain concatenation (SentencePiece's leading spaces) still gets the previous piece as context.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def finish(self) -> str:
        """Whatever is held back, replacement characters included (the sequence ended mid-character)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class StopFilter:
    """Passes text through until one of ``stops`` appears, holding back what might be the start of one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is safe to emit now; sets ``stopped`` when a stop string appeared (not emitted)."""
        if self.stopped:
            return ""
        self.pending += text
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)  # the longest tail that begins a stop string
        start = len(self.pending) - hold  # where the earliest stop string that may still complete begins
        hit = self._first_hit()
        if hit is not None and hit <= start:  # no stop string starting earlier can still complete: cut here
            return self._stop_at(hit)
        out = self.pending[:start]  # a later hit waits: an earlier-starting stop string may yet complete
        self.pending = self.pending[start:]
        return out

    def finish(self) -> str:
        """The held-back text at the end of generation (cut at a stop string that was waiting for a longer one)."""
        if self.stopped:
            return ""
        hit = self._first_hit()
        if hit is not None:
            return self._stop_at(hit)
        out, self.pending = self.pending, ""
        return out

    def _first_hit(self):
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_at(self, i: int) -> str:
        out, self.pending, self.stopped = self.pending[:i], "", True
        return out


def generate(params: dict | None, tokenizer, prompts, max_new_tokens: int = 100, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             seed: int | None = None, stop=(), stop_tokens=(), state=None, logits=None,
             chunk_size: int = DEFAULT_CHUNK, runner: RNNRunner | None = None,
             threads: int | None = None) -> Iterator[Piece]:
    """Continue each prompt (a str, or a list of str) by up to ``max_new_tokens`` tokens; yields Piece(index, text).

    Sampling options: see ``SamplingConfig`` (temperature 0 = greedy). ``seed`` fixes the draws. Generation of a
    sequence ends at ``max_new_tokens``, at a stop string (cut out, with everything after it) or at a token of
    ``stop_tokens`` (not emitted). ``state`` (a State of one sequence, or of one per prompt) continues earlier
    text; with an empty prompt its ``logits`` (those of its last token, as ``save_state`` keeps) are needed.
    Without a state an empty prompt starts from a newline. ``runner`` reuses prepared weights across calls (then ``params`` may be None).
    ``threads``: CPU threads of a runner made here (default: the environment, else every usable core).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a str or a non-empty list of str")
    if isinstance(stop, str):
        stop = [stop]
    sampling = SamplingConfig(temperature, top_k, top_p, presence_penalty, frequency_penalty)
    _check_count(max_new_tokens)
    B = len(prompts)
    if runner is None:
        if params is None:
            raise ValueError("pass params or a runner")
        if is_cupy(params["emb.weight"]):  # on the GPU: the library's own RNN mode
            runner = ReferenceRunner(params, batch_size=B)
        else:
            runner = RNNRunner(params, batch_size=B, chunk_size=chunk_size, threads=threads)
    elif runner.batch_size != B:
        runner.resize(B)
    else:
        runner.reset()
    first = start(runner, encode_prompts(tokenizer, prompts, continuing=state is not None), state, logits)
    yield from continue_from(runner, tokenizer, first, max_new_tokens, sampling, make_rng(seed), stop, stop_tokens)


def generate_text(*args, **kwargs) -> list[str]:
    """``generate`` collected: the full continuation of each prompt."""
    prompts = args[2] if len(args) > 2 else kwargs["prompts"]
    out = [""] * (1 if isinstance(prompts, str) else len(prompts))
    for piece in generate(*args, **kwargs):
        out[piece.index] += piece.text
    return out


def encode_prompts(tokenizer, prompts, continuing: bool = False) -> list:
    """Token ids (T,) of each prompt. An empty prompt stays empty when ``continuing`` a saved state; otherwise it
    becomes a newline (token 0 if the vocabulary has no newline), so the model has a token to condition on."""
    ids = [np.asarray(tokenizer.encode(p), dtype=np.int64) if p else np.zeros(0, np.int64) for p in prompts]
    if not continuing and not all(len(i) for i in ids):
        try:
            newline = np.asarray(tokenizer.encode("\n"), dtype=np.int64)[:1]
        except ValueError:  # a character vocabulary without a newline
            newline = np.zeros(0, np.int64)
        newline = newline if len(newline) else np.zeros(1, np.int64)
        ids = [i if len(i) else newline for i in ids]
    return ids


def start(runner: RNNRunner, ids: list, state=None, logits=None) -> np.ndarray:
    """Bring the runner's sequences to the end of their prompts ``ids``; -> logits (B, V) of each last token.

    From ``state`` (one sequence, broadcast to all, or one per sequence) or the zero state. An empty prompt
    continues from the state, and then needs its ``logits`` (those of the last token, as save_state keeps).
    """
    B = runner.batch_size
    if state is not None:
        runner.set_state(broadcast_state(state, B) if state.batch_size == 1 and B > 1 else state)
    out = np.empty((B, runner.config.vocab_size), runner.dtype)  # (B, V)
    empty = [b for b in range(B) if not len(ids[b])]
    if empty:
        if state is None or logits is None:
            raise ValueError("an empty prompt continues a saved state and needs the logits of its last token "
                             "(save_state(path, state, logits)); give a prompt, or a state with its logits")
        logits = np.asarray(logits)
        out[empty] = np.repeat(logits, B, axis=0)[empty] if logits.shape[0] == 1 else logits[empty]
    rows = [b for b in range(B) if len(ids[b])]
    if rows:
        out[rows] = runner.prefill([ids[b] for b in rows], rows=rows)
    return out


def continue_from(runner: RNNRunner, tokenizer, logits, max_new_tokens: int, sampling: SamplingConfig, rng,
                  stop=(), stop_tokens=()) -> Iterator[Piece]:
    """The generation loop from the runner's current state and the logits (B, V) of the last token."""
    B, V = logits.shape
    n_vocab = getattr(tokenizer, "vocab_size", V)
    if n_vocab > V:
        raise ValueError(f"the tokenizer has {n_vocab} tokens but the model only {V}: they do not belong together")
    stop_tokens = {int(t) for t in stop_tokens}
    counts = np.zeros((B, V), dtype=np.float64)  # (B, V) generated occurrences, for the penalties
    detok = [Detokenizer(tokenizer) for _ in range(B)]
    stops = [StopFilter(stop) for _ in range(B)]
    active = [True] * B
    for n in range(max_new_tokens):
        if n_vocab < V:  # padded embedding rows (the Pile models have 50277 rows for 50254 tokens): never sample
            logits = logits.copy()
            logits[:, n_vocab:] = -np.inf
        tokens = sample(logits, sampling, rng, counts)  # (B,)
        for b in range(B):
            if not active[b]:
                continue
            t = int(tokens[b])
            if t in stop_tokens:
                active[b] = False
                continue
            counts[b, t] += 1
            text = stops[b].push(detok[b].push(t))
            if text:
                yield Piece(b, text)
            if stops[b].stopped:
                active[b] = False
        if not any(active):
            break
        if n + 1 < max_new_tokens:  # the logits after the last token would never be used
            logits = runner.step(tokens)
    for b in range(B):
        if not stops[b].stopped:
            text = stops[b].push(detok[b].finish()) + stops[b].finish()
            if text:
                yield Piece(b, text)


def _check_count(max_new_tokens):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


# ---------------------------------------------------------------------------------------------------------------
# minirwkv sample
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_CHECKPOINT = "out/best.ckpt"  # where `minirwkv train` with its defaults leaves the best model


def add_sample_arguments(parser: argparse.ArgumentParser):
    """The options of ``minirwkv sample``, spelled with underscores (the command line also takes hyphens)."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="a minirwkv checkpoint (written by minirwkv train / convert) or an official RWKV-4 .pth")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeat for several prompts, sampled as one batch "
                             "(default: one empty prompt, which starts from a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy; finite, >= 0")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="nucleus: keep the smallest set of mass >= p; in (0, 1], 1: all")
    parser.add_argument("--presence_penalty", type=float, default=0.0,
                        help="subtracted from the logit of every token already generated (ChatRWKV alpha_presence)")
    parser.add_argument("--frequency_penalty", type=float, default=0.0,
                        help="subtracted per occurrence (ChatRWKV alpha_frequency)")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop at this text (repeatable; not printed; default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (>= 0)")
    parser.add_argument("--state_in", default=None,
                        help="continue from an RNN state saved with --state_out (the prompt is then appended)")
    parser.add_argument("--state_out", default=None,
                        help="save the state after the prompt to this .npz, to reuse it for many continuations "
                             "(its folders are made)")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK, help="prompt tokens per prefill block")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: MINIRWKV_NUM_THREADS / OMP_NUM_THREADS, else every usable core; "
                             "docs/threads.md)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the model runs on the GPU through CuPy (minirwkv.prefill / rnn_step, the CUDA WKV "
                             "kernels); the sampler stays on the host")
    parser.add_argument("--tokenizer", default=None,
                        help="for checkpoints without a tokenizer spec (official .pth): hf (GPT-NeoX 20B "
                             "tokenizer.json, the Pile models), world (rwkv_vocab_v20230424.txt), gpt2, byte "
                             "(default: the checkpoint's)")
    parser.add_argument("--tokenizer_path", default=None, help="the vocabulary file (or folder) of --tokenizer, or "
                                                                "where the checkpoint's vocabulary file lives now")


def check_sample_options(args) -> SamplingConfig:
    """Every option of ``minirwkv sample`` that is a number, checked before any file is read; -> the sampling."""
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.presence_penalty,
                              args.frequency_penalty)
    _check_count(args.max_new_tokens)
    make_rng(args.seed)
    if args.chunk_size < 1:
        raise ValueError(f"--chunk_size must be an integer >= 1 (prompt tokens per prefill block), got "
                         f"{args.chunk_size}")
    if getattr(args, "threads", None) is not None:
        resolve_threads(args.threads)  # a bad count fails here, in one line, before the model is read
    return sampling


def load_model(path, tokenizer_name=None, tokenizer_path=None):
    """(params float32, tokenizer) from a minirwkv checkpoint (tokenizer from its meta) or an official .pth."""
    from ..io.checkpoint import load_checkpoint, load_params
    from ..api import check_params
    from ..tokenizers.core import get_tokenizer, tokenizer_from_spec

    spec = None
    existing_file(path, "--checkpoint", "a checkpoint file", _checkpoint_in(path),
                  hint=f"`minirwkv train` writes {DEFAULT_CHECKPOINT} (and OUT_DIR/best.ckpt with --out_dir), "
                       f"`minirwkv convert` turns an official .pth into one")
    if _is_minirwkv_checkpoint(path):
        ckpt = load_checkpoint(path)
        params = {k: np.asarray(a, dtype=np.float32) for k, a in ckpt.params.items()}
        spec = ckpt.meta.get("tokenizer")
    else:
        params = load_params(path)  # a .pth, or a clear ValueError naming what the file is
    config = check_params(params)
    if tokenizer_name is not None:
        options = {"path": tokenizer_path} if tokenizer_path is not None else {}
        tokenizer = get_tokenizer(tokenizer_name, **options)
    elif spec is not None:
        tokenizer = tokenizer_from_spec(spec, path=tokenizer_path)
    else:
        raise ValueError(f"{path} carries no tokenizer (an official .pth has none): pass --tokenizer hf "
                         f"--tokenizer-path 20B_tokenizer.json for the Pile models, or --tokenizer world "
                         f"--tokenizer-path rwkv_vocab_v20230424.txt for the World models")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}: they do not belong together")
    return params, tokenizer


def to_device(params: dict) -> dict:
    """The parameters as CuPy arrays on the current GPU, or a clear error where there is none."""
    try:
        import cupy
    except ImportError:
        raise ValueError("--device cuda needs CuPy: pip install 'minirwkv[gpu]' (and a CUDA GPU)") from None
    try:
        return {k: cupy.asarray(v) for k, v in params.items()}
    except Exception as e:  # CUDARuntimeError: no device or no driver
        raise ValueError(f"--device cuda: no usable CUDA device ({e}); use --device cpu") from None


def _checkpoint_in(folder) -> str:
    """The checkpoint to suggest when a run folder is passed for a file: best.ckpt, else last.ckpt if only it is
    there."""
    from pathlib import Path

    return "last.ckpt" if (Path(folder) / "last.ckpt").exists() and not (Path(folder) / "best.ckpt").exists() \
        else "best.ckpt"


def _is_minirwkv_checkpoint(path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return "meta.json" in zf.namelist()  # the format's marker (minirwkv/checkpoint.py)
    except (OSError, zipfile.BadZipFile):
        return False


def run_sample(args) -> int:
    """``minirwkv sample``: stream one prompt's continuation to stdout; several prompts are printed when done."""
    try:
        sampling = check_sample_options(args)
        if args.state_in:
            existing_file(args.state_in, "--state_in", "a state file", "state.npz",
                          hint="write one with --state_out (or minirwkv.engine.infer.save_state)")
        if args.state_out:
            output_file(args.state_out, "--state_out", "state.npz", make=False)  # made after the prompt
        params, tokenizer = load_model(args.checkpoint, args.tokenizer, args.tokenizer_path)
        prompts = args.prompt or [""]
        state, logits = load_state(args.state_in) if args.state_in else (None, None)
        if getattr(args, "device", "cpu") == "cuda":
            runner = ReferenceRunner(to_device(params), batch_size=len(prompts))
        else:
            runner = RNNRunner(params, batch_size=len(prompts), chunk_size=args.chunk_size,
                               threads=getattr(args, "threads", None))
        first = start(runner, encode_prompts(tokenizer, prompts, continuing=state is not None), state, logits)
        if args.state_out:
            save_state(output_file(args.state_out, "--state_out", "state.npz"), runner.get_state(), first)
        pieces = continue_from(runner, tokenizer, first, args.max_new_tokens, sampling, make_rng(args.seed),
                               args.stop)
        if len(prompts) == 1:
            sys.stdout.write(prompts[0])
            for piece in pieces:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            texts = [""] * len(prompts)
            for piece in pieces:
                texts[piece.index] += piece.text
            for i, (p, t) in enumerate(zip(prompts, texts)):
                print(f"--- [{i}] ---\n{p}{t}")
    except ValueError as e:
        print(f"minirwkv sample: error: {e}", file=sys.stderr)
        return 1
    return 0
