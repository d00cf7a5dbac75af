"""The paper's analyses over quantization configurations: sweeps of one setting (ablation,
groups, clustering feature, outliers), histograms of weights and inputs, and the BatchNorm
investigation. Every analysis returns JSON-ready rows and a Markdown table and writes one PNG.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from adderquant.data import TensorLoader
from adderquant.quant.bn import batch_norms, model_device, reestimate_bn
from adderquant.quant.config import PER_CHANNEL, PaperConfig, QuantConfig, field_names
from adderquant.quant.grouping import FEATURES
from adderquant.quant.layers import adder_layers
from adderquant.quant.methods import activation_threshold
from adderquant.quant.ptq import CalibrationSet
from adderquant.studies.experiment import Experiment, predictions
from adderquant.studies.plots import save_png

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sweeps


def check_variants(variants: Sequence[tuple[str, dict[str, Any]]], base: QuantConfig) -> None:
    """Raise ``ValueError`` if a variant sets a field that ``base``'s method lacks."""
    missing = sorted({k for _, o in variants for k in o} - field_names(type(base)))
    if missing:
        raise ValueError(f"this analysis varies {missing}, which method {base.method!r} does "
                         f"not have; choose a method that has them (--method paper)")


def sweep(
    exp: Experiment, variants: Sequence[tuple[str, dict[str, Any]]], bits: Sequence[int],
    base: QuantConfig,
) -> list[dict[str, Any]]:
    """Each ``(label, overrides)`` variant of ``base`` at every bit width."""
    check_variants(variants, base)
    rows = []
    for label, overrides in variants:
        for b in bits:
            _, row = exp.run(base.replace(bits=b, **overrides))
            row["variant"] = label
            rows.append(row)
            log.info(f"{label:>28s} {b} b: top-1 {row['top1']:.1f} %  ({row['seconds']:.0f} s)")
    return rows


def format_sweep(rows: list[dict[str, Any]], title: str) -> str:
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    lines = [f"| {title} | " + " | ".join(f"{b} bits" for b in bits) + " |",
             "| --- |" + " ---: |" * len(bits)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = {r["bits"]: r["top1"] for r in rows if r["variant"] == v}
        lines.append(f"| {v} | " + " | ".join(f"{cells[b]:.1f}" for b in bits) + " |")
    return "\n".join(lines)


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
    exp: Experiment, base: QuantConfig, layers: Sequence[str], path: str | Path
) -> tuple[list[dict[str, Any]], str]:
    """Weights and activations of ``layers`` with the threshold ``A`` (by ``base.act_clip``;
    the paper's default rule for a method without one): the weights' range is 10–50× the
    activations' range."""
    observers = exp.statistics(base)
    rule = base if isinstance(base, PaperConfig) else PaperConfig(
        bits=base.bits, act_quantile=base.act_quantile)
    floats = adder_layers(exp.model)
    unknown = [n for n in layers if n not in floats]
    if unknown:
        raise ValueError(f"unknown adder layers {unknown}; choose from {sorted(floats)}")
    fig = Figure(figsize=(4 * len(layers), 6))
    axes = fig.subplots(2, len(layers), squeeze=False)
    rows = []
    for j, name in enumerate(layers):
        w = floats[name].adder.detach().float().flatten().cpu()
        x = observers[name].sample
        a = activation_threshold(observers[name], rule, base.bits)
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
    save_png(fig, path)
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
    exp: Experiment, base: QuantConfig, bits: Sequence[int], images: int, path: str | Path,
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
            log.info(f"{label}: {fp_rows[-1]['top1']:.1f} %")
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
    q_rows = sweep(exp, repairs, bits, base)
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
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
    save_png(fig, path)
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
