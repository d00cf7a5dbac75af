"""Experiments over quantization configurations: the reproduce table and the paper's analyses.

An :class:`Experiment` holds a float model, its calibration images, the test subset and the
agreement images (training images never used for calibration), and caches the calibration
statistics, which depend on the calibration settings only. Every analysis returns JSON-ready
rows, a Markdown table and writes one PNG.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import nn

from adderquant._io import write_bytes_atomic
from adderquant.data import TensorLoader, load_dataset
from adderquant.quant.bn import batch_norms, model_device, reestimate_bn
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import PER_CHANNEL, PTQConfig
from adderquant.quant.grouping import FEATURES
from adderquant.quant.layers import adder_layers
from adderquant.quant.methods import (
    FULL_PRECISION,
    LayerCache,
    ReproduceRow,
    activation_threshold,
)
from adderquant.quant.ptq import CalibrationSet, collect_statistics, ptq

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

Batches = list[tuple[torch.Tensor, torch.Tensor]]
CALIBRATION_FIELDS = ("calib_batches", "calib_batch_size", "calib_augment", "calib_pool",
                      "sample_per_batch", "report_images", "seed")


@torch.no_grad()
def logits(model: nn.Module, batches: Batches) -> torch.Tensor:
    """The model's outputs for every image (CPU tensor). On the CPU with several threads, the
    batches are shared out among that many Python threads, each running single-threaded
    kernels (they release the GIL): one thread's Python work overlaps the others' kernels and
    each keeps its batch's activations in its own core's cache."""
    model.eval()
    threads = torch.get_num_threads()
    if threads == 1 or len(batches) < 2 or model_device(model).type != "cpu":
        return torch.cat([model(x).cpu() for x, _ in batches])

    def run(part: Batches) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(x) for x, _ in part]

    parts = [batches[i::threads] for i in range(threads)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            outs = list(pool.map(run, parts))
    finally:
        torch.set_num_threads(threads)
    ordered = [outs[i % threads][i // threads] for i in range(len(batches))]
    return torch.cat(ordered)


def predictions(model: nn.Module, batches: Batches) -> torch.Tensor:
    """Top-1 class of every image (CPU tensor)."""
    return logits(model, batches).argmax(dim=1)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over images of ``KL(softmax(reference) ‖ softmax(other))`` in nats, in float64."""
    p_log = torch.log_softmax(reference.double(), dim=1)
    q_log = torch.log_softmax(other.double(), dim=1)
    return float((p_log.exp() * (p_log - q_log)).sum(dim=1).mean())


EVAL_BATCH = 64  # small enough that a batch's activations stay in the CPU's caches


def to_batches(
    images: torch.Tensor, labels: torch.Tensor, dataset: str, device: torch.device,
    batch_size: int = EVAL_BATCH,
) -> Batches:
    """Normalised batches of ``images`` on ``device``, materialised once."""
    loader = TensorLoader(images, labels, dataset, batch_size=batch_size)
    return [(x.to(device), y) for x, y in loader]


@dataclass
class Experiment:
    """A float model with its data splits; runs configurations and caches calibration."""

    model: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test: Batches
    dataset: str = "cifar10"
    agreement_images: int = 0
    extra_requests: tuple[tuple[str, float], ...] = ()
    progress: bool = False
    _statistics: dict[tuple, dict[str, ActivationObserver]] = field(default_factory=dict)
    _agreement: Batches = field(default_factory=list)
    _reference: torch.Tensor | None = None
    _test_reference: torch.Tensor | None = None
    _layers: LayerCache = field(default_factory=LayerCache)

    @classmethod
    def load(
        cls, model: nn.Module, dataset: str = "cifar10", root: str | Path | None = None,
        test_limit: int | None = None, **kwargs: Any,
    ) -> Experiment:
        device = model_device(model)
        images, labels = load_dataset(dataset, root, train=False)
        if test_limit is not None:
            images, labels = images[:test_limit], labels[:test_limit]
        train_images, train_labels = load_dataset(dataset, root, train=True)
        test = to_batches(images, labels, dataset, device)
        return cls(model.eval(), train_images, train_labels, test, dataset, **kwargs)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def check_split(self, cfg: PTQConfig) -> None:
        """Calibration images (the first ``calib_pool``) and agreement images (the last
        ``agreement_images``) must not overlap."""
        n = len(self.train_images)
        if cfg.calib_pool + self.agreement_images > n:
            raise ValueError(
                f"calib_pool={cfg.calib_pool} plus {self.agreement_images} agreement images "
                f"exceed the {n} training images; lower one of them"
            )

    def calibration_set(self, cfg: PTQConfig) -> CalibrationSet:
        self.check_split(cfg)
        return CalibrationSet(self.train_images[: cfg.calib_pool],
                              self.train_labels[: cfg.calib_pool], self.dataset,
                              cfg.calib_batch_size, cfg.calib_augment, cfg.seed)

    def statistics(self, cfg: PTQConfig) -> dict[str, ActivationObserver]:
        """Calibration statistics for ``cfg``, computed once per calibration setting."""
        key = tuple(getattr(cfg, f) for f in CALIBRATION_FIELDS)
        needed = {("released", cfg.act_quantile), ("plain", cfg.act_quantile)}
        cached = self._statistics.get(key)
        if cached is None or not needed <= set(next(iter(cached.values())).quantile_maxima):
            requests = tuple(dict.fromkeys([*self.extra_requests, *sorted(needed)]))
            self.extra_requests = requests
            cached = collect_statistics(self.model, self.calibration_set(cfg), cfg, requests,
                                        self.progress)
            self._statistics[key] = cached
        return cached

    def agreement_batches(self) -> tuple[Batches, torch.Tensor]:
        """The last ``agreement_images`` training images and the float model's logits."""
        if self._reference is None:
            n = self.agreement_images
            self._agreement = to_batches(self.train_images[-n:], self.train_labels[-n:],
                                         self.dataset, self.device)
            self._reference = logits(self.model, self._agreement)
        return self._agreement, self._reference

    def run(self, cfg: PTQConfig) -> tuple[nn.Module, dict[str, Any]]:
        """Quantize with ``cfg``; returns the model and a row: top1 on the test subset and
        top-1 agreement with the float model there (``test_agreement``), top-1 agreement on
        the agreement images and the mean KL divergence of the outputs from the float model's
        there (``agreement``, ``kl`` in nats; if agreement images were asked for), mean layer
        SQNR and seconds."""
        start = time.perf_counter()
        float_row = cfg.method == FULL_PRECISION  # its outputs are the references
        if float_row:
            qmodel, report = copy.deepcopy(self.model), {"layers": []}
        else:
            observers = self.statistics(cfg)
            qmodel, report = ptq(self.model, self.calibration_set(cfg), cfg, observers,
                                 self.progress, self._layers)
        labels = torch.cat([y for _, y in self.test])
        if self._test_reference is None:
            self._test_reference = predictions(self.model, self.test)
        predicted = self._test_reference if float_row else predictions(qmodel, self.test)
        row: dict[str, Any] = {
            "method": cfg.method, "bits": cfg.bits,
            "top1": 100.0 * float((predicted == labels).float().mean()),
            "test_agreement": 100.0 * float((predicted == self._test_reference).float().mean()),
        }
        if self.agreement_images:
            batches, reference = self.agreement_batches()
            out = reference if float_row else logits(qmodel, batches)
            row["agreement"] = 100.0 * float(
                (out.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
            row["kl"] = mean_kl(reference, out)
        sqnr = [e["sqnr_db"] for e in report["layers"] if "sqnr_db" in e]
        if sqnr:
            row["mean_sqnr_db"] = sum(sqnr) / len(sqnr)
        row["seconds"] = time.perf_counter() - start
        return qmodel, row


# --------------------------------------------------------------------------- the table


def accuracy_table(
    exp: Experiment, rows: Sequence[ReproduceRow], bits: Sequence[int], base: PTQConfig,
    log=print,
) -> list[dict[str, Any]]:
    """Run every row at every bit width (a full-precision row once)."""
    results = []
    for row in rows:
        widths = row.widths(bits)
        if not widths:
            raise ValueError(f"row {row.name} runs at {list(row.bits)} bits, none of the "
                             f"requested {list(bits)}")
        for b in widths:
            cfg = base.replace(method=row.method, **row.overrides,
                               **({"bits": b} if b is not None else {}))
            _, result = exp.run(cfg)
            result.update(method=row.name, bits=b)
            results.append(result)
            log(_progress_line(result))
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


def plot_accuracy_vs_bits(results: list[dict[str, Any]], path: str | Path,
                          key: str = "top1", title: str = "") -> None:
    """One line per method (error bars: the standard deviation over seeds, if merged)."""
    label, scale, _ = METRICS[key]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------- sweeps


def sweep(
    exp: Experiment, variants: Sequence[tuple[str, dict[str, Any]]], bits: Sequence[int],
    base: PTQConfig, log=print,
) -> list[dict[str, Any]]:
    """Each ``(label, overrides)`` variant of ``base`` at every bit width."""
    rows = []
    for label, overrides in variants:
        for b in bits:
            _, row = exp.run(base.replace(bits=b, **overrides))
            row["variant"] = label
            rows.append(row)
            log(f"{label:>28s} {b} b: top-1 {row['top1']:.1f} %  ({row['seconds']:.0f} s)")
    return rows


def format_sweep(rows: list[dict[str, Any]], title: str) -> str:
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    lines = [f"| {title} | " + " | ".join(f"{b} bits" for b in bits) + " |",
             "| --- |" + " ---: |" * len(bits)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = {r["bits"]: r["top1"] for r in rows if r["variant"] == v}
        lines.append(f"| {v} | " + " | ".join(f"{cells[b]:.1f}" for b in bits) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str, fp: float) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(variants) + 2), 4))
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
    _save(fig, path)


ABLATION = [
    ("none", {"grouping": False, "weight_clamp": False, "act_clip": "max"}),
    ("grouping", {"grouping": True, "weight_clamp": False, "act_clip": "max"}),
    ("clamp", {"grouping": False, "weight_clamp": True, "act_clip": "max"}),
    ("outliers", {"grouping": False, "weight_clamp": False, "act_clip": "released"}),
    ("grouping+clamp", {"grouping": True, "weight_clamp": True, "act_clip": "max"}),
    ("grouping+outliers", {"grouping": True, "weight_clamp": False, "act_clip": "released"}),
    ("clamp+outliers", {"grouping": False, "weight_clamp": True, "act_clip": "released"}),
    ("all three", {"grouping": True, "weight_clamp": True, "act_clip": "released"}),
]
GROUPS = [(str(g), {"grouping": True, "groups": g}) for g in (1, 2, 4, 8, 16)] + [
    (PER_CHANNEL, {"grouping": True, "groups": PER_CHANNEL})]
FEATURE_VARIANTS = [(f, {"grouping": True, "feature": f}) for f in FEATURES]
OUTLIER_RATIOS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # percent of activations discarded


def outlier_variants() -> list[tuple[str, dict[str, Any]]]:
    """A = per-batch (1 − r)-quantile of |x| (plain rule), maximum over batches."""
    out = []
    for r in OUTLIER_RATIOS:
        q = round(1.0 - r / 100.0, 6)
        out.append((f"{r:g} %", {"act_clip": "quantile", "act_quantile": q} if r else
                    {"act_clip": "max"}))
    return out


def outlier_requests() -> tuple[tuple[str, float], ...]:
    return tuple(("plain", round(1.0 - r / 100.0, 6)) for r in OUTLIER_RATIOS if r)


# --------------------------------------------------------------------------- histograms


def histograms(
    exp: Experiment, base: PTQConfig, layers: Sequence[str], path: str | Path
) -> tuple[list[dict[str, Any]], str]:
    """Weights and activations of ``layers`` with the threshold ``A``: the weights' range is
    10–50× the activations' range."""
    observers = exp.statistics(base)
    floats = adder_layers(exp.model)
    unknown = [n for n in layers if n not in floats]
    if unknown:
        raise ValueError(f"unknown adder layers {unknown}; choose from {sorted(floats)}")
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6), squeeze=False)
    rows = []
    for j, name in enumerate(layers):
        w = floats[name].adder.detach().float().flatten().cpu()
        x = observers[name].sample
        a = activation_threshold(observers[name], base, base.bits)
        rows.append({"layer": name, "max_abs_w": float(w.abs().max()), "A": a,
                     "max_x": observers[name].max,
                     "weights_beyond_A": float((w.abs() > a).float().mean()),
                     "acts_beyond_A": float((x > a).float().mean())})
        ax = axes[0][j]
        ax.hist(w.numpy(), bins=120, color="tab:blue")
        for v in (-a, a):
            ax.axvline(v, color="red", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{name}: weights (±A in red)", fontsize=9)
        ax = axes[1][j]
        ax.hist(x.numpy(), bins=120, color="tab:green")
        ax.axvline(a, color="red", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{name}: inputs (A = {a:.2f})", fontsize=9)
    _save(fig, path)
    lines = ["| layer | max abs w | A | max x | weights beyond A % | inputs beyond A % |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layer']} | {r['max_abs_w']:.1f} | {r['A']:.3f} | {r['max_x']:.3f} | "
              f"{100 * r['weights_beyond_A']:.1f} | {100 * r['acts_beyond_A']:.3f} |"
              for r in rows]
    return rows, "\n".join(lines)


# --------------------------------------------------------------------------- BatchNorm


@torch.no_grad()
def bn_input_statistics(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per-channel mean and variance (float64) of every BatchNorm's input, model in eval
    mode (inputs produced with the stored running statistics)."""
    names = {id(m): n for n, m in model.named_modules()}
    sums: dict[str, list] = {}

    def hook(module, args):
        x = args[0].double()
        dims = [0, *range(2, x.dim())]
        s = sums.setdefault(names[id(module)], [0, 0.0, 0.0])
        s[0] += x.numel() // x.shape[1]
        s[1] = s[1] + x.sum(dims).cpu()
        s[2] = s[2] + (x * x).sum(dims).cpu()

    handles = [bn.register_forward_pre_hook(hook) for bn in batch_norms(model)]
    device = model_device(model)
    model.eval()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = s / n
        out[name] = (mean, ss / n - mean * mean)
    return out


def bn_mismatch(model: nn.Module, stats: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, tuple]:
    """For every BatchNorm: mean over channels of ``|μ − running_mean| / σ_running`` and of
    ``var / running_var``."""
    out = {}
    for name, m in model.named_modules():
        if name in stats:
            mean, var = stats[name]
            rm, rv = m.running_mean.double().cpu(), m.running_var.double().cpu()
            out[name] = (float(((mean - rm).abs() / rv.sqrt()).mean()), float((var / rv).mean()))
    return out


def bn_investigation(
    exp: Experiment, base: PTQConfig, bits: Sequence[int], images: int, path: str | Path,
    log=print,
) -> tuple[dict[str, Any], str]:
    """Why BatchNorm re-estimation lowers the float model, and what repairs work best after
    quantization."""
    n = images
    pool = exp.train_images[: base.calib_pool], exp.train_labels[: base.calib_pool]
    sources = {
        "test subset": exp.test,
        "train, plain": TensorLoader(pool[0][:n], pool[1][:n], exp.dataset, 256),
        "train, crop+flip": TensorLoader(pool[0][:n], pool[1][:n], exp.dataset, 256,
                                         augment=True, seed=base.seed),
    }
    mismatch = {k: bn_mismatch(exp.model, bn_input_statistics(exp.model, v))
                for k, v in sources.items()}
    labels = torch.cat([y for _, y in exp.test])

    def top1(model: nn.Module) -> float:
        return 100.0 * float((predictions(model, exp.test) == labels).float().mean())

    fp_rows = [{"variant": "checkpoint statistics", "top1": top1(exp.model)}]
    for augment in (True, False):
        for momentum in (0.1, None):
            model = copy.deepcopy(exp.model)
            calib = CalibrationSet(pool[0], pool[1], exp.dataset, base.calib_batch_size,
                                   augment, base.seed)
            reestimate_bn(model, calib.batches(base.bn_batches), momentum)
            label = (f"re-estimated, {'crop+flip' if augment else 'plain'}, "
                     f"{'momentum 0.1' if momentum else 'cumulative'}")
            fp_rows.append({"variant": label, "top1": top1(model)})
            log(f"{label}: {fp_rows[-1]['top1']:.1f} %")
    repairs = [
        ("none", {"bias_correction": "none", "bn_reestimate": False}),
        ("bias correction (float inputs)", {"bias_correction": "float-input",
                                            "bn_reestimate": False}),
        ("bias correction (quantized inputs)", {"bias_correction": "quant-input",
                                                "bn_reestimate": False}),
        ("BN re-estimation (crop+flip)", {"bias_correction": "none", "bn_reestimate": True}),
        ("BN re-estimation (plain)", {"bias_correction": "none", "bn_reestimate": True,
                                      "calib_augment": False}),
        ("bias correction + BN", {"bias_correction": "float-input", "bn_reestimate": True}),
    ]
    q_rows = sweep(exp, repairs, bits, base, log)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.barh([r["variant"] for r in fp_rows], [r["top1"] for r in fp_rows], color="tab:blue")
    ax1.set_xlim(min(r["top1"] for r in fp_rows) - 3, 100)
    ax1.set_xlabel("full-precision test top-1 (%)")
    ax1.set_title("float model after BatchNorm re-estimation", fontsize=9)
    variants = list(dict.fromkeys(r["variant"] for r in q_rows))
    bit_list = sorted({r["bits"] for r in q_rows}, reverse=True)
    width = 0.8 / len(bit_list)
    for i, b in enumerate(bit_list):
        vals = [next(r["top1"] for r in q_rows if r["variant"] == v and r["bits"] == b)
                for v in variants]
        ax2.barh([j + i * width for j in range(len(variants))], vals, width, label=f"{b} bits")
    ax2.set_yticks([j + width * (len(bit_list) - 1) / 2 for j in range(len(variants))])
    ax2.set_yticklabels(variants, fontsize=8)
    ax2.set_xlabel("quantized test top-1 (%)")
    ax2.set_title(f"repairs after quantization ({base.method})", fontsize=9)
    ax2.legend(fontsize=8)
    _save(fig, path)
    lines = [f"BatchNorm inputs vs the checkpoint's running statistics ({n} images; "
             "mean over channels of |μ − running mean|/σ, and of var/running var):", "",
             "| BatchNorm | " + " | ".join(sources) + " |", "| --- |" + " ---: |" * len(sources)]
    for name in mismatch["test subset"]:
        cells = [f"{mismatch[k][name][0]:.3f} / {mismatch[k][name][1]:.3f}" for k in sources]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| float model | test top-1 |", "| --- | ---: |"]
    lines += [f"| {r['variant']} | {r['top1']:.1f} |" for r in fp_rows]
    lines += ["", format_sweep(q_rows, "repair after quantization")]
    return {"mismatch": mismatch, "float": fp_rows, "repairs": q_rows}, "\n".join(lines)
