"""Numba kernels for the CPU: fastexp.py (a vectorisable exp), ops.py (fused element-wise pairs and AdamW),
wkvN.py (the WKV of generation N, forward and backward), inferN.py (RNN-mode step kernels). docs/numba.md."""
