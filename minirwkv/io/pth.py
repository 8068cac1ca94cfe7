"""Read official RWKV-4 ``.pth`` files (``torch.save`` of a state dict) with NumPy alone: no torch, no code execution.

A ``.pth`` written by ``torch.save`` (PyTorch >= 1.6) is a zip archive, every entry stored uncompressed:

    <name>/data.pkl         a pickle of the state dict; each tensor is a call
                            torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)
                            whose ``storage`` is a *persistent id* ('storage', torch.FloatStorage, key, 'cpu', numel)
    <name>/data/<key>       the raw bytes of storage <key> (little-endian unless <name>/byteorder says 'big')
    <name>/byteorder, <name>/version, <name>/.format_version, ...

``<name>`` is the file's stem at save time and varies. Unpickling normally imports whatever the pickle names, so a
``.pth`` from an untrusted source can run any code (``os.system``). Here a restricted ``pickle.Unpickler`` resolves
only the few names a tensor state dict needs, each to a NumPy stand-in of our own; any other name raises
``ForbiddenGlobalError`` before anything is called. Storages are memory-mapped from the zip (copy on write), so a
large file is read once, by the pages the caller touches.

bfloat16 has no NumPy dtype; its payload is the high half of a float32, so widening is exact:
``(u16.astype(uint32) << 16).view(float32)``.

Mirrors ``torch.serialization._load`` (persistent_load, _rebuild_tensor_v2) and ``torch._weights_only_unpickler``.
"""
from __future__ import annotations

import collections
import mmap
import pickle
import pickletools
import struct
import sys
import zipfile
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write

# torch's storage classes -> the element type stored in the archive. Integer storages are harmless data: they
# appear in checkpoints converted by the ``rwkv`` package (uint8 weights), which the caller then refuses by name.
STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # bf16 payload; widened by to_numpy
    "DoubleStorage": "f8",
    "ByteStorage": "u1",
    "CharStorage": "i1",
    "ShortStorage": "i2",
    "IntStorage": "i4",
    "LongStorage": "i8",
    "BoolStorage": "?",
}

# The first bytes of the pre-1.6 (non-zip) format: a pickled magic number 0x1950a86a20f9469cfc6c, protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class ForbiddenGlobalError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the tensor state-dict allowlist; nothing was called."""


class _StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` etc.: only its name reaches us, inside a persistent id."""

    name: str


class Storage(NamedTuple):
    """One storage of the archive: a flat array of its element type (bf16 kept as its uint16 payload)."""

    data: np.ndarray  # (numel,) a view into the memory-mapped file, or a copy for compressed entries
    kind: str  # the torch storage class name, e.g. "BFloat16Storage"


class PthTensor(NamedTuple):
    """A tensor as the pickle describes it; ``to_numpy`` makes the array. Nothing is read until then."""

    storage: Storage
    offset: int  # in elements
    shape: tuple
    stride: tuple  # in elements

    @property
    def is_bfloat16(self) -> bool:
        return self.storage.kind == "BFloat16Storage"

    @property
    def is_floating(self) -> bool:
        return self.storage.kind in ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage")

    def view(self) -> np.ndarray:
        """The raw elements as a strided view of the storage (bf16 as uint16), bounds-checked first."""
        data = self.storage.data
        if self.offset < 0 or any(s < 0 for s in self.stride) or any(n < 0 for n in self.shape):
            raise ValueError(f"corrupt .pth: negative offset/size/stride {self.offset}, {self.shape}, {self.stride}")
        if len(self.shape) != len(self.stride):
            raise ValueError(f"corrupt .pth: size {self.shape} and stride {self.stride} differ in length")
        if 0 in self.shape:
            return np.empty(self.shape, dtype=data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if last >= data.shape[0]:
            # as_strided does not check: reading past the storage would read arbitrary memory
            raise ValueError(f"corrupt .pth: tensor of size {self.shape}, stride {self.stride}, offset "
                             f"{self.offset} reaches element {last} of a storage of {data.shape[0]}")
        return np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.shape, strides=[s * data.itemsize for s in self.stride])

    def to_numpy(self, dtype=np.float32) -> np.ndarray:
        """Floating tensors as ``dtype`` (bf16 widened exactly); integer tensors keep their type.

        The result is a view of the file's pages (copy on write) when no conversion or reordering is needed.
        """
        raw = self.view()
        if self.is_bfloat16:
            # the bf16 bits are the top 16 bits of the float32 with the same value: exact
            raw = (raw.astype(np.uint32) << 16).view(np.float32)  # copies, contiguous
        if self.is_floating and dtype is not None:
            raw = raw.astype(dtype, copy=False)
        return raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a tensor is (storage, offset, size, stride); the rest is autograd."""
    if not isinstance(storage, Storage):
        raise ValueError(f"corrupt .pth: a tensor refers to {type(storage).__name__}, not a storage")
    return PthTensor(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    """``torch._utils._rebuild_tensor`` (older files): same without the autograd arguments."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter``: an nn.Parameter is its tensor; we keep only the data."""
    return data


# The allowlist: (module, name) -> what the pickle gets instead. Nothing here imports or runs foreign code.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # the state dict and its _metadata
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``_ALLOWED`` names and reads storages from the zip."""

    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages  # key -> Storage, loaded on first reference

    def find_class(self, module, name):
        # Called for GLOBAL, STACK_GLOBAL, INST and EXT* opcodes, before the object is used: refusing here means
        # the forbidden callable is never even imported.
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"refusing to unpickle global '{module}.{name}': a plain tensor state dict never needs it, and "
                f"unpickling it could run code. Allowed: {', '.join(sorted(m + '.' + n for m, n in _ALLOWED))}"
            ) from None

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel), as written by torch.serialization._save
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise ValueError(f"corrupt .pth: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return self._storages(key, storage_type.name, int(numel))


def _entry_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Byte offset of an entry's data in the file: after its *local* header, whose extra field may differ in length
    from the central directory's copy (torch pads it to align storages to 64 bytes)."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"corrupt zip: no local header for entry {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


ALIGN = 64  # bytes: where torch starts each storage in the file, so memory-mapped views are aligned


def write_aligned_entry(zf: zipfile.ZipFile, name: str, write, nbytes: int, compress: bool = False):
    """Add entry ``name`` to ``zf``, ``write(file)`` filling it, its data starting at a multiple of ``ALIGN`` in the
    file. Like torch's writer, pad the local header's extra field (the data follows the header directly)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zip64 = nbytes > (1 << 30)  # decided here, since zipfile then adds a 20-byte zip64 field to the header
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
    pad = (-(start + 4)) % ALIGN
    info.extra = struct.pack("<HH", 0xA1A1, pad) + b"\0" * pad  # an unregistered id: readers skip it
    with zf.open(info, "w", force_zip64=zip64) as f:
        write(f)


class ZipArrays:
    """Flat arrays read from the entries of a zip: a view of one copy-on-write memory map for stored entries
    (the caller may write to the array; the file is never modified), a copy for compressed ones."""

    def __init__(self, path):
        self.path = str(path)
        self._file = open(self.path, "rb")
        try:
            self.zip = zipfile.ZipFile(self._file)
        except zipfile.BadZipFile as e:
            self._file.close()
            raise ValueError(f"{self.path}: not a readable zip archive ({e}); the file is truncated or corrupt")
        self._size = self._file.seek(0, 2)
        self._map = None

    def read(self, name: str, dtype, count: int | None = None, offset: int = 0) -> np.ndarray:
        """Elements of ``dtype`` from entry ``name``, starting ``offset`` bytes into the entry."""
        dtype = np.dtype(dtype)
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            raise ValueError(f"{self.path}: entry {name!r} is missing; the file is truncated or corrupt") from None
        length = info.file_size - offset
        if count is None:
            count = length // dtype.itemsize
        if count * dtype.itemsize > length:
            raise ValueError(f"{self.path}: entry {name!r} holds {length} bytes, {count} x {dtype} expected")
        start = _entry_data_offset(self._file, info) + offset
        if info.compress_type != zipfile.ZIP_STORED or start % dtype.alignment:
            with self.zip.open(info) as f:  # decompresses and checks the CRC
                data = f.read()
            return np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
        if start + info.file_size - offset > self._size:
            raise ValueError(f"{self.path}: entry {name!r} runs past the end of the file; the file is truncated")
        if count == 0:
            return np.empty(0, dtype=dtype)
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=start)

    def close(self):
        # the mmap stays alive while arrays view it; closing the file handle is safe
        self.zip.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_pth(path) -> dict:
    """The state dict of a torch zip ``.pth`` as {name: PthTensor or plain value}, without materialising tensors."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_LEGACY_MAGIC):
        raise ValueError(f"{path}: a .pth in torch's legacy (pre-1.6, non-zip) format, which is not supported; "
                         f"re-save it with a recent torch: torch.save(torch.load(f), 'new.pth')")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path}: not a torch .pth (a zip archive); first bytes {head[:8]!r}")
    with ZipArrays(path) as arrays:
        pkl = [n for n in arrays.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: a zip archive but not a torch .pth (expected one '<name>/data.pkl', "
                             f"found {pkl or 'none'})")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in arrays.zip.namelist():
            byteorder = arrays.zip.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        cache = {}

        def storage(key, kind, numel):
            if key not in cache:
                dtype = np.dtype(STORAGE_DTYPES[kind])
                if byteorder != sys.byteorder:
                    dtype = dtype.newbyteorder()
                cache[key] = Storage(arrays.read(f"{prefix}data/{key}", dtype, count=numel), kind)
            return cache[key]

        with arrays.zip.open(pkl[0]) as f:
            state = _StateDictUnpickler(f, storage).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a pickled {type(state).__name__}, not a state dict")
    return dict(state)


def load_pth(path, dtype=np.float32) -> dict:
    """Load a torch ``.pth`` state dict as {name: ndarray}, floating tensors converted to ``dtype``.

    fp32, fp16, bf16 (widened exactly) and fp64 storages are read; non-tensor values are returned as they are.
    """
    return {k: (v.to_numpy(dtype) if isinstance(v, PthTensor) else v) for k, v in read_pth(path).items()}


# ------------------------------------------------------------------------------------------------ writing


def _plain(value) -> bytes:
    """Pickle opcodes of a plain value (str, int, float, bool, None, tuples of these), without PROTO and STOP."""
    if not isinstance(value, (str, int, float, bool, type(None), tuple)):
        raise ValueError(f"save_pth writes arrays and plain values only, not {type(value).__name__}")
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]  # optimize drops the memo PUTs


def save_pth(path, state: dict, archive_name: str = "archive") -> None:
    """Write ``state`` ({name: ndarray or plain value}) as a torch zip ``.pth`` that ``torch.load`` reads.

    For test fixtures and exports without torch. The pickle is assembled opcode by opcode, the way
    ``torch.serialization._save`` lays it out: each array becomes ``torch._utils._rebuild_tensor_v2(storage, 0,
    size, stride, False, OrderedDict())`` with the storage as a persistent id and its bytes in ``data/<i>``.
    float32/16/64 and integer arrays only (NumPy has no bfloat16).
    """
    kinds = {np.dtype(v): k for k, v in STORAGE_DTYPES.items() if k != "BFloat16Storage"}
    ops, storages = [b"\x80\x02}("], []  # PROTO 2, EMPTY_DICT, MARK
    for name, value in state.items():
        ops.append(_plain(str(name)))
        if not isinstance(value, np.ndarray):
            ops.append(_plain(value))
            continue
        kind = kinds.get(value.dtype.newbyteorder("="))
        if kind is None:
            raise ValueError(f"{name}: no torch storage type for dtype {value.dtype}")
        # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
        array = np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")
        stride = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        pid = b"(" + _plain("storage") + f"ctorch\n{kind}\n".encode() + _plain(str(len(storages))) + _plain("cpu")
        pid += _plain(array.size) + b"t"  # TUPLE: the persistent id, then BINPERSID
        ops.append(b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + _plain(0) + _plain(array.shape)
                   + _plain(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
        storages.append(array)
    ops.append(b"u.")  # SETITEMS, STOP
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        root = archive_name + "/"
        zf.writestr(root + "data.pkl", b"".join(ops))
        zf.writestr(root + "byteorder", "little")
        for i, array in enumerate(storages):
            write_aligned_entry(zf, f"{root}data/{i}", lambda f, a=array: f.write(a.tobytes()), array.nbytes)
        zf.writestr(root + "version", "3\n")
