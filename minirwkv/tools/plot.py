"""The loss curve of a run, from its ``log.jsonl``, as a PNG (matplotlib, from the ``plot`` extra).

Two panels: loss against the step and against the wall-clock seconds (the x-axis of a time-budget comparison).
Training never fails for want of matplotlib: ``plot_log`` raises ``PlotUnavailable`` with the remedy and the
loop prints it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path


class PlotUnavailable(RuntimeError):
    pass


def read_log(path) -> list[dict]:
    """The records of ONE run in a ``log.jsonl``: {"kind": "train" | "eval" | "resume", "step", ...} per line.

    A line that is not whole JSON (a write torn by a full disk or a kill) is dropped with a warning naming the file.
    A resumed run logs {"kind": "resume", "step": S}: the records an earlier segment wrote after step S (it ran on
    past its last checkpoint before it stopped) are replaced by the resumed run's, so the log reads as one run.
    """
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {number} is not whole JSON (a torn write); skipped", stacklevel=2)
            continue
        if record.get("kind") == "resume":
            records = [r for r in records if r.get("step", 0) <= record["step"]]
        records.append(record)
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
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
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
