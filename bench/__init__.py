"""Benchmarks that print figures and ratios, never assert them; installed as ``minirwkv.bench``.

    python -m minirwkv.bench [--only wkv|step|precision] [--threads N]   training.py: the WKV kernels against the
                                                                           roofline, a training step against HF
    python -m minirwkv.bench.infer [--threads N]                          infer.py: RNN-mode tokens/s against the
                                                                           roofline and the official rwkv package
    common.py                                                             median timings, copy bandwidth, the
                                                                           environment, tables

docs/benchmarks.md says how to read the figures and lists the latest.
"""
from .training import main

__all__ = ["main"]
