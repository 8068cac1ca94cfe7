"""The vocabularies of the official RWKV checkpoints, from files the user supplies (nothing is downloaded).

    WorldTokenizer  RWKV "World" models (rwkv_vocab_v20230424.txt, 65529 tokens): greedy longest match over bytes,
                    the official ``TRIE_TOKENIZER`` of BlinkDL/ChatRWKV ``rwkv_pip_package/src/rwkv/rwkv_tokenizer.py``
    HFTokenizer     RWKV-4 "Pile" models (GPT-NeoX 20B ``tokenizer.json``, 50277 tokens) through the ``tokenizers``
                    package, the optional extra ``pip install minirwkv[hf]``

Both follow the protocol of minirwkv/tokenizer.py. Their spec stores the file's path and sha256: a checkpoint names
the vocabulary it needs, and rebuilding it from a different file (same name, other contents) raises.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from .ids import check_ids, file_sha256

_ID = 256  # the key under which a trie node stores its token id: never a byte value (0..255)


def _open_checked(path, expected_sha256, what: str) -> tuple[Path, str]:
    """The path and sha256 of a user-supplied vocabulary file; clear errors if it is absent or not the expected one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} not found. minirwkv does not ship or download it: obtain "
                                f"it from the model's release and pass its location (path=, --tokenizer_path)")
    sha256 = file_sha256(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ValueError(f"{path} has sha256 {sha256}, but the checkpoint was trained with a file whose sha256 is "
                         f"{expected_sha256}: a different vocabulary would make the model read wrong tokens. Pass "
                         f"the original file")
    return path, sha256


class WorldTokenizer:
    """The RWKV World vocabulary: each line ``<id> <Python literal of a str or bytes> <length in bytes>``.

    Literals are parsed with ``ast.literal_eval`` (the official reader calls ``eval``): a vocabulary file cannot run
    code. Encoding walks a byte trie and takes the longest token that matches at each position, left to right, as
    ``TRIE_TOKENIZER.encodeBytes``. Id 0 is the World models' end of text; it has no line and decodes to "".
    """

    name = "world"

    def __init__(self, path, expected_sha256: str | None = None):
        self.path, self.sha256 = _open_checked(path, expected_sha256, "RWKV World vocabulary")
        self.id_to_bytes: dict[int, bytes] = {}
        self._root: dict = {}
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").split("\n"), start=1):
            if line.strip():
                token_id, token = self._parse_line(line, lineno)
                self._insert(token, token_id, lineno)
        if not self.id_to_bytes:
            raise ValueError(f"{self.path} holds no tokens; expected lines like: 257 'ab' 2")
        self.vocab_size = max(self.id_to_bytes) + 1

    def _parse_line(self, line: str, lineno: int) -> tuple[int, bytes]:
        where = f"{self.path}, line {lineno}"
        try:
            first, last = line.index(" "), line.rindex(" ")
            token_id, length = int(line[:first]), int(line[last:])
            token = ast.literal_eval(line[first:last].strip())
        except (ValueError, SyntaxError, TypeError) as e:
            raise ValueError(f"{where}: expected '<id> <str or bytes literal> <length>', got {line!r} ({e})") from e
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or len(token) != length or not token:
            raise ValueError(f"{where}: the token must be a non-empty str or bytes literal of {length} bytes (as "
                             f"UTF-8), got {token!r}")
        if token_id in self.id_to_bytes:
            raise ValueError(f"{where}: id {token_id} appears twice")
        self.id_to_bytes[token_id] = token
        return token_id, token

    def _insert(self, token: bytes, token_id: int, lineno: int):
        node = self._root
        for byte in token:
            node = node.setdefault(byte, {})
        if _ID in node:
            raise ValueError(f"{self.path}, line {lineno}: token {token!r} already has id {node[_ID]}")
        node[_ID] = token_id

    def encode(self, text: str) -> np.ndarray:
        data = text.encode("utf-8")
        ids, start = [], 0
        while start < len(data):
            node, best, end, i = self._root, None, start, start
            while i < len(data) and data[i] in node:  # walk down as far as the bytes match
                node = node[data[i]]
                i += 1
                if _ID in node:  # a token ends here: the longest so far
                    best, end = node[_ID], i
            if best is None:
                raise ValueError(f"byte 0x{data[start]:02x} at byte offset {start} of the text starts no token of "
                                 f"{self.path}; the official World vocabulary holds all 256 single bytes, is this "
                                 f"file complete?")
            ids.append(best)
            start = end
        return np.asarray(ids, dtype=np.int32)  # (T,)

    def decode(self, ids) -> str:
        pieces = []
        for i in check_ids(ids, self.vocab_size).tolist():
            if i not in self.id_to_bytes and i != 0:
                raise ValueError(f"token id {i} has no entry in {self.path}")
            pieces.append(self.id_to_bytes.get(i, b""))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"name": "world", "vocab_size": self.vocab_size, "path": str(self.path), "sha256": self.sha256}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json: the GPT-NeoX 20B vocabulary of the RWKV-4 Pile models.

    ``tokenizers`` is imported here, not at module import, so minirwkv works without the ``hf`` extra. Encoding
    adds no special tokens; decoding maps bytes that are not valid UTF-8 to U+FFFD (the ByteLevel decoder does).
    """

    name = "hf"

    def __init__(self, path, expected_sha256: str | None = None):
        try:
            import tokenizers
        except ImportError as e:
            raise RuntimeError("the 'hf' tokenizer needs the tokenizers package: pip install minirwkv[hf] (or pip "
                               "install tokenizers)") from e
        self.path, self.sha256 = _open_checked(path, expected_sha256, "Hugging Face tokenizer.json")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)  # (T,)

    def decode(self, ids) -> str:
        return self._tokenizer.decode(check_ids(ids, self.vocab_size).tolist(), skip_special_tokens=False)

    def spec(self) -> dict:
        return {"name": "hf", "vocab_size": self.vocab_size, "path": str(self.path), "sha256": self.sha256}
