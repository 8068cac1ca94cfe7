"""Initialisers the official RWKV code uses, for NumPy (bit-for-bit torch is not a goal; the distributions are)."""
from __future__ import annotations

import numpy as np


def orthogonal(rng, shape, gain):
    """torch.nn.init.orthogonal_: QR of a Gaussian matrix, signs fixed by diag(R), scaled by gain. shape (rows, cols)."""
    rows, cols = shape
    a = rng.standard_normal((rows, cols) if rows >= cols else (cols, rows))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    return gain * (q if rows >= cols else q.T)
