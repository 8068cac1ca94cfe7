"""The loss curve of a run, from its ``log.jsonl``, as a PNG (matplotlib, from the ``plot`` extra).

Two panels: loss against the step and against the wall-clock seconds (the x-axis of a time-budget comparison).
Training never fails for want of matplotlib: ``plot_log`` raises ``PlotUnavailable`` with the remedy and the
loop prints it.
"""
from __future__ import annotations

import json
from pathlib import Path


class PlotUnavailable(RuntimeError):
    pass


def read_log(path) -> list[dict]:
    """The records of a ``log.jsonl``: {"kind": "train" | "eval", "step", "elapsed", ...} per line."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def plot_log(log_path, png_path=None) -> Path:
    """Draw train loss and val loss against step and elapsed seconds; returns the PNG's path (default loss.png
    next to the log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the loss curve needs matplotlib: pip install 'minirwkv[plot]' (log.jsonl has the "
                              "numbers meanwhile)") from None
    log_path = Path(log_path)
    png_path = Path(png_path) if png_path else log_path.with_name("loss.png")
    records = read_log(log_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x in zip(axes, ("step", "elapsed")):
        ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
        ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val")
        ax.set_xlabel("step" if x == "step" else "wall-clock seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats per token)")
    axes[0].legend()
    fig.suptitle(str(log_path.parent))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
