"""Figures of the studies, drawn with matplotlib's object-oriented interface (no pyplot, no
process-wide backend) and written atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from adderquant._io import write_bytes_atomic
from adderquant.studies.reproduce import METRICS


def save_png(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def plot_accuracy_vs_bits(results: list[dict[str, Any]], path: str | Path,
                          key: str = "top1", title: str = "") -> None:
    """One line per method (error bars: the standard deviation over seeds, if merged)."""
    label, scale, _ = METRICS[key]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m in dict.fromkeys(r["method"] for r in results):
        pts = sorted((r["bits"], scale * r[key], scale * r.get(f"{key}_sd", 0.0))
                     for r in results if r["method"] == m and r["bits"] is not None and key in r)
        fp = [scale * r[key] for r in results if r["method"] == m and r["bits"] is None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=m)
        if fp and key != "kl":
            ax.axhline(fp[0], color="grey", linestyle="--", label=f"{m} ({fp[0]:.1f})")
    if key == "kl":
        ax.set_yscale("log")
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel(label)
    ax.set_title(title or "accuracy vs bits, 1,000-image test subset")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str, fp: float) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    fig = Figure(figsize=(max(5, 1.1 * len(variants) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(bits)
    for i, b in enumerate(bits):
        vals = [next(r["top1"] for r in rows if r["variant"] == v and r["bits"] == b)
                for v in variants]
        ax.bar([j + i * width for j in range(len(variants))], vals, width, label=f"{b} bits")
    ax.axhline(fp, color="grey", linestyle="--", label=f"full precision ({fp:.1f})")
    ax.set_xticks([j + width * (len(bits) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(variants, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)
