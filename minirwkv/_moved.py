"""Old import paths of modules that moved when the package was laid out for several generations.

``import minirwkv.model`` (and ``python -m minirwkv.bench_infer``) keep working: each old name is an alias of the
module's new home, the same module object (so classes keep their identity). New code imports the new paths; the
table is the record of what moved where (docs/architecture.md).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "minirwkv.ops": "minirwkv.layers",
    "minirwkv.xp": "minirwkv.devices",
    "minirwkv.wkv": "minirwkv.rwkv4.wkv",
    "minirwkv.model": "minirwkv.rwkv4.model",
    "minirwkv.rnn": "minirwkv.rwkv4.rnn",
    "minirwkv.backends.ops_registry": "minirwkv.backends.engine",
    "minirwkv.backends.numba_wkv": "minirwkv.backends.numba.wkv4",
    "minirwkv.backends.numba_ops": "minirwkv.backends.numba.ops",
    "minirwkv.backends.numba_infer": "minirwkv.backends.numba.infer4",
    "minirwkv.backends.fastexp": "minirwkv.backends.numba.fastexp",
    "minirwkv.backends.cupy_wkv": "minirwkv.backends.cuda.cupy_wkv4",
    "minirwkv.backends.shim_wkv": "minirwkv.backends.cuda.shim_wkv4",
    "minirwkv.bench_infer": "minirwkv.bench.infer",
    "minirwkv.train": "minirwkv.engine.train",
    "minirwkv.optim": "minirwkv.engine.optim",
    "minirwkv.data": "minirwkv.engine.data",
    "minirwkv.infer": "minirwkv.engine.infer",
    "minirwkv.generate": "minirwkv.engine.generate",
    "minirwkv.sampling": "minirwkv.engine.sampling",
    "minirwkv.distributed": "minirwkv.engine.distributed",
    "minirwkv.process": "minirwkv.engine.process",
    "minirwkv.atomic": "minirwkv.io.atomic",
    "minirwkv.checkpoint": "minirwkv.io.checkpoint",
    "minirwkv.pth": "minirwkv.io.pth",
    "minirwkv.tokenizer": "minirwkv.tokenizers.core",
    "minirwkv.tokenizer_world": "minirwkv.tokenizers.world",
    "minirwkv.bpe": "minirwkv.tokenizers.bpe",
    "minirwkv.backends.numba_bpe": "minirwkv.tokenizers.numba_bpe",
    "minirwkv.plot": "minirwkv.tools.plot",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])  # the module itself, not a copy

    def exec_module(self, module):
        pass  # already executed at its new path

    def get_code(self, fullname):  # runpy (python -m OLD) runs the new module's code
        return importlib.util.find_spec(MOVED[fullname]).loader.get_code(MOVED[fullname])


def install():
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
