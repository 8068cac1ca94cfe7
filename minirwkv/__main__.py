"""``python -m minirwkv ...``: the same as the ``minirwkv`` command (minirwkv/cli.py)."""
import sys

from .cli import main

sys.exit(main())
