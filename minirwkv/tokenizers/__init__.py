"""Tokenizers: core.py (byte, char, BPE and GPT-2 through tiktoken; specs that checkpoints carry), bpe.py (training
BPE merges; numba_bpe.py its compiled trainer), world.py (RWKV World and Hugging Face tokenizer files).
docs/tokenizers.md."""
