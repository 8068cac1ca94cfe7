"""RWKV-6 'Finch' (and RWKV-5.2, its constant-decay case): a matrix-valued state per head, with a per-token,
per-key-channel decay.

    wkv.py     the matrix WKV, written twice and independently: the recurrent reference (``wkv6_step``, the one
               token that RNN mode will share) and the chunked parallel form built on matrix products, each with
               its own hand-written backward

The math: docs/rwkv6.md. This package does not register a generation yet; importing it does no work.
"""
