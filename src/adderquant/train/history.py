"""A run's log: one JSON object per epoch (``log.jsonl``) and the loss / accuracy plot."""

from __future__ import annotations

import io
import json
import os

from adderquant._io import write_bytes_atomic


def write_log(path: str | os.PathLike, history: list[dict]) -> None:
    """``history`` as JSON lines, replacing the file atomically (a resumed run rewrites the
    rows of its checkpoint, so rows of epochs run after it and then lost do not linger)."""
    write_bytes_atomic(path, "".join(json.dumps(row) + "\n" for row in history).encode())


def write_plot(path: str | os.PathLike, history: list[dict], title: str) -> None:
    """Training and validation loss (left) and top-1 accuracy (right) per epoch, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss, top1 = fig.subplots(1, 2)
    for ax, key, label in ((loss, "loss", "cross-entropy loss"), (top1, "top1", "top-1 (%)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", ms=3, label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
