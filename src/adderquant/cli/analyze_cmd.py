"""``adderquant analyze NAME``: the paper's analyses, each writing a table and a PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from adderquant._io import write_bytes_atomic, write_json_atomic
from adderquant.cli.common import (
    add_model_args,
    build_model,
    dataset_name,
)
from adderquant.cli.config_args import add_config_args, config_from_args, given_fields
from adderquant.cli.validate import bit_width, positive_int
from adderquant.quant.config import PaperConfig, QuantConfig, field_names
from adderquant.quant.report import json_ready
from adderquant.studies.analyses import (
    ABLATION,
    FEATURE_VARIANTS,
    GROUPS,
    bn_investigation,
    check_variants,
    format_sweep,
    histograms,
    outlier_requests,
    outlier_variants,
    sweep,
)
from adderquant.studies.experiment import Experiment
from adderquant.studies.plots import plot_accuracy_vs_bits, plot_sweep
from adderquant.studies.reproduce import accuracy_table, format_accuracy_table, select_rows

SWEEPS = {
    "ablation": (ABLATION, "parts of the method on/off"),
    "groups": (GROUPS, "number of groups G"),
    "feature": (FEATURE_VARIANTS, "clustering feature"),
    "outliers": (None, "discarded activation outliers"),
}
ANALYSES = (*SWEEPS, "histograms", "bits", "bn")
DEFAULT_LAYERS = ["layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="the paper's analyses (ablation, groups, feature, outliers, ...)",
        description="ablation: grouping / weight clamp / outlier clamp on and off; groups: "
        "G in 1,2,4,8,16,per-channel; feature: the clustering feature; outliers: share of "
        "discarded activations 0-1 %%; histograms: weights and inputs of --layers; bits: "
        "accuracy vs bits of every method; bn: BatchNorm re-estimation and bias correction. "
        "The configuration flags set the base that each analysis varies.",
    )
    p.add_argument("names", nargs="+", choices=ANALYSES, metavar="NAME",
                   help=f"analyses to run, sharing one calibration: {', '.join(ANALYSES)}")
    add_model_args(p)
    p.add_argument("--out", default="runs/analysis", metavar="DIR",
                   help="folder for NAME.md, NAME.json and NAME.png (default: %(default)s)")
    p.add_argument("--sweep-bits", type=bit_width, nargs="+", default=[6, 4],
                   help="bit widths of the sweeps (default: %(default)s)")
    p.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS,
                   help="layers for histograms (default: %(default)s)")
    p.add_argument("--bn-images", type=positive_int, default=2048,
                   help="images per source for the BatchNorm statistics (default: 2048)")
    add_config_args(p, PaperConfig.method)
    p.set_defaults(func=run, output_dirs={"out": output_files})


def output_files(args: argparse.Namespace) -> list[str]:
    """The files an analysis run writes in ``--out``."""
    return [f"{name}.{ext}" for name in dict.fromkeys(args.names) for ext in ("md", "json", "png")]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    base = config_from_args(args)
    for name in args.names:  # before any data is read
        if name in SWEEPS:
            check_variants(SWEEPS[name][0] or outlier_variants(), base)
    extra = outlier_requests() if "outliers" in args.names else ()
    exp = Experiment.load(build_model(args), dataset_name(args), args.data, args.limit,
                          extra_requests=extra, progress=not args.no_progress)
    exp.check_split(base)
    fp = exp.run(None)[1]["top1"]
    for name in dict.fromkeys(args.names):
        analyze(name, exp, base, fp, args)
    print(f"\nfinished in {time.perf_counter() - start:.0f} s")
    return 0


def analyze(
    name: str, exp: Experiment, base: QuantConfig, fp: float, args: argparse.Namespace
) -> None:
    """Run one analysis; write NAME.md, NAME.json and NAME.png under ``--out``."""
    out = Path(args.out)
    png = out / f"{name}.png"
    if name in SWEEPS:
        variants, title = SWEEPS[name]
        data = sweep(exp, variants or outlier_variants(), args.sweep_bits, base)
        table = format_sweep(data, title)
        plot_sweep(data, png, f"{title} ({base.method}), full precision {fp:.1f} %", fp)
    elif name == "histograms":
        data, table = histograms(exp, base, args.layers, png)
    elif name == "bits":
        shared = field_names(QuantConfig)  # the settings given that every row has
        data = accuracy_table(exp, select_rows(None), args.sweep_bits,
                              {k: v for k, v in given_fields(args).items() if k in shared})
        table = format_accuracy_table(data)
        plot_accuracy_vs_bits(data, png)
    else:
        data, table = bn_investigation(exp, base, args.sweep_bits, args.bn_images, png)
    n_test = sum(len(y) for _, y in exp.test)
    text = (f"{name}: test top-1 (%) on the {n_test}-image test subset "
            f"(full precision {fp:.1f} %); base configuration: method {base.method}\n\n{table}")
    write_bytes_atomic(out / f"{name}.md", (text + "\n").encode())
    write_json_atomic(out / f"{name}.json",
                      json_ready({"config": base.as_dict(), "fp_top1": fp, "rows": data}))
    print(text)
    print(f"wrote {out}/{name}.md, .json and .png")
