"""File formats: checkpoint.py (minirwkv's zip of .npy + JSON; load_params reads any supported file), pth.py (official
PyTorch .pth files, read without PyTorch or pickle execution), atomic.py (writes that never leave a half file).
docs/checkpoints.md."""
