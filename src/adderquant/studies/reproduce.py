"""The reproduce table: its rows (a named configuration each, run at every bit width), the
table of results, runs merged over calibration seeds, and the Markdown formatting."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adderquant.quant.config import (
    FAITHFUL,
    AdderQuantConfig,
    PaperConfig,
    QSSFConfig,
    QuantConfig,
    field_names,
)
from adderquant.quant.qat_config import QATConfig
from adderquant.quant.qssf_repaired import QSSFRepairedConfig
from adderquant.studies.experiment import FULL_PRECISION, Experiment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReproduceRow:
    """One method of the reproduce table: ``name`` (the method plus an optional hyphenated
    variant suffix) and its configuration (``None``: the float model); ``bits`` is ``None``
    for a row evaluated once (full precision). Rows with ``default`` false (the ablations, and
    quantization-aware training, which takes minutes per width) run only when asked for by name
    or with ``--methods all``. ``qat``: train the post-training result with these settings."""

    name: str
    config: QuantConfig | None
    bits: tuple[int, ...] | None = (8, 6, 5, 4, 3, 2)
    default: bool = True
    qat: QATConfig | None = None

    def widths(self, requested: Sequence[int]) -> list[int | None]:
        """The requested widths this row runs at (``[None]`` for a row run once; empty when
        it runs at none of them)."""
        return [None] if self.bits is None else [b for b in requested if b in self.bits]

    def configure(self, bits: int | None, overrides: dict[str, Any]) -> QuantConfig | None:
        """The row's configuration at ``bits`` with the ``overrides`` it has settings for."""
        if self.config is None:
            return None
        own = {k: v for k, v in overrides.items() if k in field_names(type(self.config))}
        return self.config.replace(**own, **({"bits": bits} if bits is not None else {}))


# The rows, in table order: full precision, the shared-scale baseline (and, on request, its
# repaired form: the better scale source per layer and bias correction), the paper's method as
# released and at its best, the ablation of the project's method (same grid alone, + clip
# search, + groups; on request), the project's method and its mixed precision at the column's
# average width.
REPRODUCE_ROWS: list[ReproduceRow] = [
    ReproduceRow(FULL_PRECISION, None, bits=None),
    ReproduceRow("qssf", QSSFConfig(qssf_source="max", bias_correction="none")),
    ReproduceRow("qssf-repaired", QSSFRepairedConfig(), default=False),
    ReproduceRow("paper-faithful", PaperConfig(**FAITHFUL)),
    ReproduceRow("paper", PaperConfig()),
    ReproduceRow("adderquant-grid", AdderQuantConfig(clip_search=False, grouping=False,
                                                     mean_correction=False), default=False),
    ReproduceRow("adderquant-clip", AdderQuantConfig(grouping=False, mean_correction=False),
                 default=False),
    ReproduceRow("adderquant-groups", AdderQuantConfig(mean_correction=False), default=False),
    ReproduceRow("adderquant", AdderQuantConfig()),
    ReproduceRow("adderquant-mixed", AdderQuantConfig(mixed_precision=True), bits=(6, 5, 4, 3)),
    ReproduceRow("adderquant-qat", AdderQuantConfig(), bits=(4, 3, 2), default=False,
                 qat=QATConfig()),
]


def select_rows(names: list[str] | None) -> list[ReproduceRow]:
    """The rows named (in table order), every row for ``["all"]``, the default rows for
    ``None``."""
    if not names:
        return [r for r in REPRODUCE_ROWS if r.default]
    if names == ["all"]:
        return list(REPRODUCE_ROWS)
    unknown = sorted(set(names) - {r.name for r in REPRODUCE_ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from "
                         f"{[r.name for r in REPRODUCE_ROWS]} or 'all'")
    return [r for r in REPRODUCE_ROWS if r.name in names]


def accuracy_table(
    exp: Experiment, rows: Sequence[ReproduceRow], bits: Sequence[int],
    overrides: dict[str, Any] | None = None, qat_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every row at every bit width (a full-precision row once), each with the
    ``overrides`` it has settings for; rows with QAT settings take ``qat_overrides`` too."""
    results = []
    for row in rows:
        widths = row.widths(bits)
        if not widths:
            raise ValueError(f"row {row.name} runs at {list(row.bits)} bits, none of the "
                             f"requested {list(bits)}")
        for b in widths:
            qat = row.qat.replace(**(qat_overrides or {})) if row.qat is not None else None
            _, result = exp.run(row.configure(b, overrides or {}), qat=qat)
            result.update(method=row.name, bits=b)
            results.append(result)
            log.info(_progress_line(result))
    return results


def _progress_line(r: dict[str, Any]) -> str:
    bits = "fp" if r["bits"] is None else f"{r['bits']} b"
    agree = f"  agreement {r['agreement']:.2f} %" if "agreement" in r else ""
    return f"{r['method']:>16s} {bits:>5s}: top-1 {r['top1']:.1f} %{agree}  ({r['seconds']:.0f} s)"


# key: (title, scale, decimals) of a table column; decimals None: three significant digits
METRICS: dict[str, tuple[str, float, int | None]] = {
    "top1": ("test top-1 (%)", 1.0, 1),
    "agreement": ("top-1 agreement (%)", 1.0, 2),
    "kl": ("KL divergence from full precision (10^-3 nats)", 1e3, None),
    "test_agreement": ("top-1 agreement on the test images (%)", 1.0, 1),
}


def _decimals(value: float, decimals: int | None) -> int:
    if decimals is not None:
        return decimals
    return max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0


def over_seeds(runs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the rows of runs with different calibration seeds (the same rows in the same
    order): each metric becomes its mean, with ``<metric>_sd`` (sample standard deviation)
    and ``<metric>_seeds`` (the values per seed); ``seconds`` is summed."""
    if len(runs) == 1:
        return list(runs[0])
    merged = []
    for rows in zip(*runs, strict=True):
        if len({(r["method"], r["bits"]) for r in rows}) != 1:
            raise ValueError("runs to merge must hold the same rows in the same order")
        row = {"method": rows[0]["method"], "bits": rows[0]["bits"],
               "seconds": sum(r["seconds"] for r in rows)}
        for key in [*METRICS, "mean_sqnr_db"]:
            if key in rows[0]:
                values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
                row[key] = float(values.mean())
                row[f"{key}_sd"] = float(values.std())
                row[f"{key}_seeds"] = values.tolist()
        merged.append(row)
    return merged


def format_accuracy_table(results: list[dict[str, Any]], key: str = "top1") -> str:
    """Methods as rows, bit widths as columns (full precision in its own column); a metric
    merged over seeds shows ``mean ± sd``."""
    _, scale, decimals = METRICS[key]
    bits = sorted({r["bits"] for r in results if r["bits"] is not None}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in results))
    head = "| method | " + " | ".join(["FP", *[f"{b} bits" for b in bits]]) + " |"
    lines = [head, "| --- |" + " ---: |" * (len(bits) + 1)]

    def cell(r: dict[str, Any]) -> str:
        d = _decimals(scale * r[key], decimals)
        text = f"{scale * r[key]:.{d}f}"
        sd = r.get(f"{key}_sd")
        return text if sd is None else f"{text} ± {scale * sd:.{d}f}"

    for m in methods:
        cells = {r["bits"]: cell(r) for r in results if r["method"] == m and key in r}
        row = [cells.get(None, "")] + [cells.get(b, "") for b in bits]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)
