"""Helpers shared by the tutorials: where pictures go, optional matplotlib, and the closing comparison table.

Not part of the package: the tutorials are scripts, and this file sits next to them (``import _common`` works
when a tutorial runs as ``python tutorials/NN_name.py`` or opens as a notebook in this folder).

The table is the ``cmp`` of Karpathy's makemore_part4_backprop: for each comparison, whether the arrays are
bitwise equal (exact), whether they agree to the named tolerance (approx), and the largest difference (maxdiff).
Tolerances are never chosen here: they come from ``minirwkv.testing`` (``assert_close`` and its TOLERANCES table),
so a tutorial passes exactly when the test suite's rule would.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minirwkv.testing import assert_close

PASS_MARKER = "ALL CHECKS PASSED"  # tests/test_tutorials.py looks for this line
FAIL_MARKER = "SOME CHECKS FAILED"


def out_dir() -> Path:
    """Where pictures are saved: $MINIRWKV_OUT if set, else tutorials/out/ (git-ignored). Created if missing."""
    here = Path(__file__).resolve().parent
    path = Path(os.environ.get("MINIRWKV_OUT") or here / "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (with a one-line message) when the plot extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # write PNGs; never open a window (CI has no display)
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'minirwkv[plot]'): skipping the pictures")
        return None
    return plt


def ascii_heatmap(m, levels=" .:-=+*#%@") -> str:
    """A 2-D array of values in [0, 1] as characters, darker = larger; NaN/-inf (masked) entries print as blanks."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float64), nan=0.0, neginf=0.0)
    idx = np.clip((m * (len(levels) - 1)).round().astype(int), 0, len(levels) - 1)
    return "\n".join("".join(levels[i] * 2 for i in row) for row in idx)


class Checks:
    """Collects comparisons, prints them as one table, and fails loudly if any did not pass."""

    def __init__(self, title: str):
        self.title = title
        self.rows = []  # (what, exact, approx, maxdiff, max|ref|, ok, why it failed)

    def close(self, what, actual, expected, dtype=np.float64, kind="same", scale=None):
        """Compare two arrays with ``minirwkv.testing.assert_close(actual, expected, dtype, kind)``."""
        a = np.asarray(actual, dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
        exact = a.shape == e.shape and bool(np.array_equal(a, e))
        try:
            assert_close(actual, expected, dtype, kind=kind, what=what, scale=scale)
            ok, note = True, ""
        except AssertionError as err:
            ok, note = False, str(err)
        finite = a.shape == e.shape and np.isfinite(a).all() and np.isfinite(e).all()
        maxdiff = float(np.max(np.abs(a - e), initial=0.0)) if finite else float("nan")
        ref = max(float(np.max(np.abs(e), initial=0.0)) if np.isfinite(e).all() else float("nan"), float(scale or 0))
        self.rows.append((what, exact, f"{ok} ({np.dtype(dtype).name}/{kind})", maxdiff, ref, ok, note))
        return ok

    def exact(self, what, actual, expected):
        """Bitwise equality: for operations that only move numbers around (a shift, a copy)."""
        a, e = np.asarray(actual), np.asarray(expected)
        ok = a.shape == e.shape and bool(np.array_equal(a, e))
        maxdiff = float(np.max(np.abs(a.astype(np.float64) - e), initial=0.0)) if a.shape == e.shape else float("nan")
        note = "" if ok else f"{what}: not bitwise equal"
        self.rows.append((what, ok, "(exact)", maxdiff, float(np.max(np.abs(e), initial=0.0)), ok, note))
        return ok

    def true(self, what, condition, detail=""):
        """A yes/no fact (e.g. 'the naive float32 recurrence produced NaN'), shown with a short detail."""
        ok = bool(condition)
        self.rows.append((what, None, detail, None, None, ok, "" if ok else f"{what}: false ({detail})"))
        return ok

    def report(self):
        """Print the table, then the pass marker, or raise AssertionError naming every failed comparison."""
        w = max(len(r[0]) for r in self.rows) if self.rows else 10
        print(f"\n{self.title}")
        header = f"{'compared':<{w}} | exact | approx (dtype/kind)           |  maxdiff  | max|ref|  | pass"
        print(header)
        print("-" * len(header))
        for what, exact, approx, maxdiff, ref, ok, _ in self.rows:
            ex = "  -  " if exact is None else f"{str(exact):<5}"
            md = "    -    " if maxdiff is None else f"{maxdiff:9.2e}"
            rf = "    -    " if ref is None else f"{ref:9.2e}"
            print(f"{what:<{w}} | {ex} | {approx:<29} | {md} | {rf} | {'ok' if ok else 'FAIL'}")
        failed = [r for r in self.rows if not r[5]]
        if failed:
            print(FAIL_MARKER)
            raise AssertionError("failed: " + "; ".join(r[6] for r in failed))
        print(PASS_MARKER)
