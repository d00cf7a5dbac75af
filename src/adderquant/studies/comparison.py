"""AdderNet against CNN: both families quantized at every width, scored the same way.

Every row (a family, a method, a width) gets the test top-1, the top-1 agreement and the mean
output KL divergence against its own family's float model on the held-out training images
(the helpers of :mod:`adderquant.studies.experiment`), and the operation counts and energy per
image of the quantized model itself (:mod:`adderquant.engine.energy`). Adder rows are rows of
the reproduce table (:mod:`adderquant.studies.reproduce`); CNN rows are the methods of
:mod:`adderquant.quant.cnn`. Both families calibrate on the same calibration pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from adderquant.engine.energy import EnergyTable, count_ops, summarize
from adderquant.quant.cnn import CNNPTQConfig, calibrate_cnn, fold_batchnorm, quantize_cnn
from adderquant.quant.config import QuantConfig
from adderquant.studies.experiment import FULL_PRECISION, Experiment, logits, mean_kl
from adderquant.studies.plots import save_png
from adderquant.studies.reproduce import format_accuracy_table, select_rows

log = logging.getLogger(__name__)

ADDER, CNN = "adder", "cnn"
ADDER_DEFAULT = ("qssf", "qssf-repaired", "paper", "adderquant")
ROW_FIELDS = ("family", "method", "bits", "top1", "test_agreement", "agreement", "kl",
              "energy_uj", "additions", "multiplications", "ops", "seconds")


class Renormalize(nn.Module):
    """Maps inputs normalised with one ``(mean, std)`` to another: a model trained with other
    input statistics than the dataset's sees the inputs it expects."""

    def __init__(self, source: tuple[Sequence[float], Sequence[float]],
                 target: tuple[Sequence[float], Sequence[float]]) -> None:
        super().__init__()
        (m0, s0), (m1, s1) = ([torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
                               for v in pair] for pair in (source, target))
        self.register_buffer("gain", (s0 / s1).float())
        self.register_buffer("offset", ((m0 - m1) / s1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.offset


@dataclass
class Scorer:
    """Scores models of one family against its float model on an experiment's images."""

    exp: Experiment
    _test_reference: torch.Tensor | None = field(default=None, repr=False)

    def score(self, model: nn.Module) -> dict[str, float]:
        """Test top-1 and agreement, and agreement and mean KL (nats) on the agreement images
        (if the experiment has any), all in percent but KL."""
        exp = self.exp
        labels = torch.cat([y for _, y in exp.test])
        if self._test_reference is None:
            self._test_reference = logits(exp.model, exp.test).argmax(dim=1)
        predicted = (self._test_reference if model is exp.model
                     else logits(model, exp.test).argmax(dim=1))
        row = {"top1": 100.0 * float((predicted == labels).float().mean()),
               "test_agreement": 100.0 * float(
                   (predicted == self._test_reference).float().mean())}
        if exp.agreement_images:
            batches, reference = exp.agreement_batches()
            out = reference if model is exp.model else logits(model, batches)
            row["agreement"] = 100.0 * float(
                (out.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
            row["kl"] = mean_kl(reference, out)
        return row


def energy_fields(model: nn.Module, input_shape: tuple[int, ...],
                  table: EnergyTable) -> dict[str, Any]:
    """Energy per image (µJ) and operation counts of ``model``."""
    summary = summarize(count_ops(model, (1, *input_shape)), table)
    return {k: summary[k] for k in ("energy_uj", "additions", "multiplications", "ops")}


def adder_rows(
    exp: Experiment, methods: Sequence[str], bits: Sequence[int], overrides: dict[str, Any],
    input_shape: tuple[int, ...], table: EnergyTable,
) -> list[dict[str, Any]]:
    """The float adder model and every named reproduce row at every width it runs at, each
    with the ``overrides`` it has settings for."""
    rows = []
    for row in select_rows([FULL_PRECISION, *methods]):
        for b in row.widths(bits):
            start = time.perf_counter()
            qmodel, result = exp.run(row.configure(b, overrides))
            rows.append(_row(ADDER, row.name, b, result,
                             energy_fields(qmodel, input_shape, table), start))
    return rows


def cnn_rows(
    exp: Experiment, methods: Sequence[str], bits: Sequence[int], calibration: QuantConfig,
    cfg: CNNPTQConfig, input_shape: tuple[int, ...], table: EnergyTable,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The float CNN and every CNN method at every width; calibration batches come from the
    experiment's calibration set of ``calibration`` (the adder rows' pool, batch size and
    seed)."""
    scorer = Scorer(exp)
    start = time.perf_counter()
    rows = [_row(CNN, FULL_PRECISION, None, scorer.score(exp.model),
                 energy_fields(exp.model, input_shape, table), start)]
    folded = fold_batchnorm(exp.model)
    observers = calibrate_cnn(
        folded, exp.calibration_set(calibration).batches(cfg.calib_batches), cfg, progress)
    cache: dict[tuple, Any] = {}  # what the methods share across widths
    for method in methods:
        for b in bits:
            start = time.perf_counter()
            qmodel, _ = quantize_cnn(folded, observers, method, b, cfg, cache)
            rows.append(_row(CNN, method, b, scorer.score(qmodel),
                             energy_fields(qmodel, input_shape, table), start))
    return rows


def _row(family: str, method: str, bits: int | None, scores: dict[str, Any],
         energy: dict[str, Any], start: float) -> dict[str, Any]:
    row = {"family": family, "method": method, "bits": bits,
           **{k: scores[k] for k in ("top1", "test_agreement", "agreement", "kl")
              if k in scores},
           **energy, "seconds": time.perf_counter() - start}
    width = "fp" if bits is None else f"{bits} b"
    agree = f"  agreement {row['agreement']:.2f} %" if "agreement" in row else ""
    log.info(f"{family:>5s} {method:>14s} {width:>5s}: top-1 {row['top1']:.1f} %{agree}  "
             f"{row['energy_uj']:.2f} µJ  ({row['seconds']:.0f} s)")
    return row


def pareto_front(rows: Sequence[dict[str, Any]], key: str = "top1") -> list[int]:
    """Indices of the rows no other row beats on both ``key`` (higher) and energy (lower),
    by increasing energy."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["energy_uj"], -rows[i][key]))
    front, best = [], float("-inf")
    for i in order:
        if rows[i][key] > best:
            front.append(i)
            best = rows[i][key]
    return front


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """One line per row: accuracy, agreement, KL, energy and operation counts."""
    front = set(pareto_front(rows))
    lines = ["| family | method | bits | top-1 (%) | agreement (%) | KL (10^-3 nats) | "
             "energy (µJ) | additions (M) | multiplications (M) | Pareto |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for i, r in enumerate(rows):
        bits = "fp" if r["bits"] is None else str(r["bits"])
        agreement = f"{r['agreement']:.2f}" if "agreement" in r else ""
        kl = f"{1e3 * r['kl']:.3g}" if "kl" in r else ""
        lines.append(f"| {r['family']} | {r['method']} | {bits} | {r['top1']:.1f} | "
                     f"{agreement} | {kl} | {r['energy_uj']:.3f} | {r['additions'] / 1e6:.2f} | "
                     f"{r['multiplications'] / 1e6:.2f} | {'*' if i in front else ''} |")
    return "\n".join(lines)


def format_top1_by_bits(rows: Sequence[dict[str, Any]], key: str = "top1") -> str:
    """Methods of both families as rows, widths as columns."""
    return format_accuracy_table(
        [{**r, "method": f"{r['family']}: {r['method']}"} for r in rows], key)


def _label(r: dict[str, Any]) -> str:
    return f"{r['family']}: {r['method']}"


def plot_accuracy_vs_bits(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Test top-1 against bits, one line per method; adder methods solid, CNN dashed; each
    family's float model as a horizontal line."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label in dict.fromkeys(_label(r) for r in rows if r["bits"] is not None):
        pts = sorted((r["bits"], r["top1"]) for r in rows
                     if _label(r) == label and r["bits"] is not None)
        style = "-" if label.startswith(ADDER) else "--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    for r in rows:
        if r["bits"] is None:
            ax.axhline(r["top1"], color="black" if r["family"] == ADDER else "grey",
                       linestyle=":", linewidth=1, label=f"{r['family']} float ({r['top1']:.1f})")
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("adder ResNet-20 vs convolutional ResNet-20, post-training quantization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)


def plot_accuracy_vs_energy(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Test top-1 against energy per image (log scale), circles adder, squares CNN, the
    Pareto front (more accurate for less energy) as a black step line."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label in dict.fromkeys(_label(r) for r in rows):
        pts = [r for r in rows if _label(r) == label]
        marker = "o" if label.startswith(ADDER) else "s"
        ax.scatter([r["energy_uj"] for r in pts], [r["top1"] for r in pts], marker=marker,
                   s=22, label=label)
    front = [rows[i] for i in pareto_front(rows)]
    ax.step([r["energy_uj"] for r in front], [r["top1"] for r in front], where="post",
            color="black", linewidth=1, label="Pareto front")
    for r in front:
        ax.annotate("fp" if r["bits"] is None else f"{r['bits']}b", (r["energy_uj"], r["top1"]),
                    textcoords="offset points", xytext=(3, -9), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("energy per image (µJ, 45 nm)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy vs energy per image")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)

