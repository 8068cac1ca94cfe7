"""The minirwkv checkpoint format, and loading parameters from it or from an official RWKV ``.pth`` (v4, v5.2, v6).

Our format executes nothing when loaded: a zip archive (entries stored, or deflated with ``compress=True``) of

    meta.json                  {"format": "minirwkv-checkpoint", "version": 1,
                                "config": {"vocab_size": V, "n_embd": C, "n_layer": L, "dim_ffn": F},
                                "meta": <whatever JSON the caller passed: step, tokenizer, backend, train config>}
    params/<official key>.npy  one array per parameter, official RWKV names and shapes
    <group>/<name>.npy         other arrays, e.g. adam_m/<key>.npy, adam_v/<key>.npy

Every ``.npy`` is read with ``allow_pickle=False`` semantics (object arrays refused); stored entries are
memory-mapped copy-on-write, as in ``minirwkv.pth``, and each is aligned to 64 bytes in the file so the views are
aligned. Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``.

``load_params`` tells the formats apart by content, not by the file name, and refuses, naming what the file is:
checkpoints converted by the ``rwkv`` package, RWKV-5 and later, rwkv.cpp ``.bin``, Hugging Face ``transformers``
RWKV, safetensors, torch's legacy format, empty, truncated and unknown files.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zipfile
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write, remove_orphan_temps
from ..config import ModelConfig
from ..api import check_params
from .pth import PthTensor, ZipArrays, read_pth, write_aligned_entry

FORMAT = "minirwkv-checkpoint"
VERSION = 1


class Checkpoint(NamedTuple):
    params: dict  # official key -> ndarray, as saved (dtype kept), shapes as the generation's param_shapes
    meta: dict  # the caller's metadata, as JSON gives it back (tuples come back as lists)
    arrays: dict  # group -> {name -> ndarray}, e.g. {"adam_m": {...}, "adam_v": {...}}


# ------------------------------------------------------------------------------------------------ writing


def _check_name(name, what):
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{what} {name!r} cannot be a file name in the checkpoint: use a non-empty string "
                         f"without '/' or '\\'")


def _write_npy(zf: zipfile.ZipFile, name: str, array: np.ndarray, compress: bool):
    """One ``.npy`` entry. numpy pads the header to a multiple of 64 bytes, so with the entry aligned the data is
    aligned too, and a memory-mapped view of it is an aligned array."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ValueError(f"{name}: object arrays cannot be saved (they would need pickle)")
    write_aligned_entry(zf, name, lambda f: np.lib.format.write_array(f, array, allow_pickle=False),
                        array.nbytes, compress)


def save_checkpoint(path, params: dict, meta: dict | None = None, arrays: dict | None = None,
                    compress: bool = False) -> None:
    """Write ``params`` (official keys), ``meta`` (JSON-able) and ``arrays`` (group -> name -> array) to ``path``.

    Atomic: written to a temporary file in the same folder, flushed and fsynced, then moved over ``path`` with
    ``os.replace``. On any failure the temporary file is removed and a previous file at ``path`` is untouched.
    """
    # finiteness is not checked: the state of a diverged run is worth saving, to look at
    config = check_params(params, check_finite=False)
    meta = {} if meta is None else meta
    arrays = {} if arrays is None else arrays
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    for group, named in arrays.items():
        _check_name(group, "array group")
        if group == "params":
            raise ValueError("array group 'params' is reserved for the model parameters")
        if not isinstance(named, dict):
            raise ValueError(f"arrays[{group!r}] must be a dict name -> array, got {type(named).__name__}")
        for name in named:
            _check_name(name, f"array name in group {group!r}")
    for name in params:
        _check_name(name, "parameter name")
    header = {"format": FORMAT, "version": VERSION,
              "config": {"vocab_size": config.vocab_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                         "dim_ffn": config.dim_ffn},
              "meta": meta}
    try:
        meta_json = json.dumps(header, indent=1)  # before opening anything: fail early on numpy scalars
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable (plain int/float/str/list/dict; convert numpy scalars "
                         f"with float() or .item()): {e}") from None

    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(zipfile.ZipInfo("meta.json", date_time=(1980, 1, 1, 0, 0, 0)), meta_json)
            for name, array in params.items():
                _write_npy(zf, f"params/{name}.npy", array, compress)
            for group, named in arrays.items():
                for name, array in named.items():
                    _write_npy(zf, f"{group}/{name}.npy", array, compress)


# ------------------------------------------------------------------------------------------------ reading


def _read_npy(zarrays: ZipArrays, name: str) -> np.ndarray:
    """One ``.npy`` entry: parse the header (no pickle), then view the data in the memory map."""
    with zarrays.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{zarrays.path}: {name} has unsupported .npy version {version}")
        data_offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{zarrays.path}: {name} holds Python objects (pickle); refusing to load it")
    count = int(np.prod(shape, dtype=np.int64))
    flat = zarrays.read(name, dtype, count=count, offset=data_offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def load_checkpoint(path) -> Checkpoint:
    """Read a minirwkv checkpoint: Checkpoint(params, meta, arrays), arrays in the dtype they were saved in."""
    path = os.fspath(path)
    kind = _sniff(path)
    if kind != "minirwkv":
        raise ValueError(f"{path}: not a minirwkv checkpoint; it is {kind}"
                         + (" (use load_params, or convert it first)" if kind == "torch" else ""))
    with ZipArrays(path) as zarrays:
        header = _read_meta(zarrays)
        params, arrays = {}, {}
        for name in zarrays.zip.namelist():
            if name == "meta.json":
                continue
            group, _, leaf = name.partition("/")
            if not leaf.endswith(".npy") or "/" in leaf or not group:
                raise ValueError(f"{path}: unexpected entry {name!r} in a {FORMAT} v{VERSION} file")
            array = _read_npy(zarrays, name)
            if group == "params":
                params[leaf[:-4]] = array
            else:
                arrays.setdefault(group, {})[leaf[:-4]] = array
    return Checkpoint(params=params, meta=header.get("meta", {}), arrays=arrays)


def _read_meta(zarrays: ZipArrays) -> dict:
    try:
        header = json.loads(zarrays.zip.read("meta.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{zarrays.path}: unreadable meta.json ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{zarrays.path}: meta.json does not say format {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ValueError(f"{zarrays.path}: {FORMAT} version {header.get('version')!r}; this minirwkv reads "
                         f"version {VERSION} only (a newer file needs a newer minirwkv)")
    return header


# Key fragments that mark checkpoints this engine cannot run, and what they are.
_RWKV7 = (".att.r_k", ".att.x_r")  # RWKV-7's bonus weight and token-shift mix
_RWKV_PACKAGE = ("_strategy", "_version", "_rescale_layer")


def _refuse_foreign_keys(path, keys):
    """Name the checkpoint families we recognise but cannot use, by their keys."""
    keys = list(keys)
    found = [k for k in _RWKV_PACKAGE if k in keys]
    if found:
        raise ValueError(f"{path}: a checkpoint converted by the `rwkv` pip package (keys {found}): ln0 folded "
                         f"into emb, time_decay already -exp(), matrices transposed or quantised. Load the "
                         f"original .pth instead")
    later = sorted({frag for k in keys for frag in _RWKV7 if frag in k})
    if later:
        raise ValueError(f"{path}: an RWKV-7 checkpoint (keys with {later}); this minirwkv runs RWKV-4, RWKV-5.2 "
                         f"and RWKV-6")
    tuned = [k for k in keys if k.endswith(".att.time_state")]
    if tuned:
        raise ValueError(f"{path}: a state-tuned checkpoint ({tuned[0]}, ...: a trained initial state), which "
                         f"minirwkv does not load; remove the time_state keys to run the base model")
    if any(k.startswith("rwkv.") for k in keys):
        raise ValueError(f"{path}: a Hugging Face transformers RWKV checkpoint (keys 'rwkv.embeddings.weight', ...)"
                         f"; load the original .pth it was converted from (official key names)")


def _sniff(path) -> str:
    """What the file is, by content: 'minirwkv', 'torch', or raise ValueError naming what it is instead."""
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith((".ckpt", ".pth")))
        hint = f"e.g. {os.path.join(path, inside[0])}" if inside else "the .ckpt or .pth file, not its folder"
        raise ValueError(f"{path}: is a folder, not a checkpoint file; give the file inside it ({hint})")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror}); check the path") from None
    if size == 0:
        raise ValueError(f"{path}: the file is empty (an interrupted download or save?)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == struct.pack("<i", 0x67676D66):
        raise ValueError(f"{path}: an rwkv.cpp .bin file (magic 'ggmf'); its tensors are squeezed, time_decay "
                         f"stored as -exp(), possibly quantised. Load the original .pth instead")
    if head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"):
        raise ValueError(f"{path}: a .pth in torch's legacy (pre-1.6, non-zip) format, which is not supported; "
                         f"re-save it with a recent torch: torch.save(torch.load(f), 'new.pth')")
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        raise ValueError(f"{path}: a safetensors file, which is not supported; load the original .pth")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path}: not a checkpoint this library knows (neither a zip archive nor a known header; "
                         f"first bytes {head[:8]!r})")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: a damaged zip archive ({e}): truncated or corrupt; save or download it "
                         f"again") from None
    if "meta.json" in names:
        return "minirwkv"
    if any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names):
        return "torch"
    raise ValueError(f"{path}: a zip archive that is neither a minirwkv checkpoint (meta.json) nor a torch .pth "
                     f"(<name>/data.pkl); it holds {names[:5]}{' ...' if len(names) > 5 else ''}")


def load_params(path, dtype=np.float32) -> dict:
    """RWKV parameters {official key: ndarray of ``dtype``} from a minirwkv checkpoint or an official ``.pth``
    (RWKV-4, RWKV-5.2 or RWKV-6; the generation is detected from the names).

    The format is detected by content. Shapes are the official ones (what ``init_params`` returns); the config
    follows from them. Raises ValueError naming the file's kind when it is a format we recognise but cannot use.
    """
    path = os.fspath(path)
    kind = _sniff(path)
    if kind == "minirwkv":
        params = load_checkpoint(path).params
        params = {k: v.astype(dtype, copy=False) for k, v in params.items()}
    else:
        state = read_pth(path)
        _refuse_foreign_keys(path, state)
        not_tensors = [k for k, v in state.items() if not isinstance(v, PthTensor)]
        if not_tensors:
            raise ValueError(f"{path}: not a plain RWKV state dict: {not_tensors[:5]} are not tensors")
        not_float = [k for k, v in state.items() if not v.is_floating]
        if not_float:
            raise ValueError(f"{path}: integer tensors {not_float[:5]}: a quantised checkpoint, not an official "
                             f"RWKV .pth")
        params = {k: v.to_numpy(dtype) for k, v in state.items()}
    try:
        check_params(params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return params


# ------------------------------------------------------------------------------------------------ convert


def convert(src, dst, dtype=np.float32) -> ModelConfig:
    """Read any supported checkpoint ``src`` and write it to ``dst`` in the minirwkv format; return its config.

    The tokenizer spec of a minirwkv source is kept (``sample`` then decodes as the model was trained); missing
    parent folders of ``dst`` are created, and a folder at ``dst`` is refused (the file would replace nothing)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(dst):
        raise ValueError(f"{dst}: is a folder; give the output file's name, e.g. "
                         f"{os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + '.ckpt')}")
    kind = _sniff(src)
    params = load_params(src, dtype=dtype)
    config = check_params(params, check_finite=False)
    meta = {"converted_from": os.path.basename(src), "source_format": kind}
    if kind == "minirwkv":
        tokenizer = load_checkpoint(src).meta.get("tokenizer")
        if tokenizer is not None:
            meta["tokenizer"] = tokenizer
    folder = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{dst}: a parent of this path is a file, not a folder; choose another output path") \
            from None
    remove_orphan_temps(folder)  # what an earlier, killed convert left there
    save_checkpoint(dst, params, meta=meta)
    return config


def main(argv=None) -> int:
    """``minirwkv convert MODEL.pth OUT [--dtype float32]``: argv is what follows the subcommand."""
    parser = argparse.ArgumentParser(prog="minirwkv convert",
                                     description="Convert an RWKV checkpoint (.pth or minirwkv; v4, v5.2, v6) to the minirwkv "
                                                 "format, without torch and without executing the file.")
    parser.add_argument("src", help="official RWKV .pth (fp32, fp16 or bf16) or a minirwkv checkpoint")
    parser.add_argument("dst", help="output file (written atomically; missing parent folders are created)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the saved parameters (default float32; bf16 widens exactly)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        config = convert(args.src, args.dst, dtype=np.dtype(args.dtype))
    except ValueError as e:
        print(f"minirwkv convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, a full disk: the source and any earlier output are untouched
        print(f"minirwkv convert: error: {e.filename or args.dst}: {e.strerror}; check the path, its permissions "
              f"and the free space", file=sys.stderr)
        return 1
    n = config.n_params()
    print(f"{args.src} -> {args.dst}: {config}, {n:,} parameters, {args.dtype}, "
          f"{os.path.getsize(args.dst) / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
