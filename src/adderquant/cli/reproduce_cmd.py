"""``adderquant reproduce``: the accuracy table of full precision, the shared-scale baseline
(QSSF) and the paper's method (faithful and best configurations) at every bit width."""

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
from adderquant.cli.config_args import add_field_flag, given_fields
from adderquant.cli.validate import bit_width, non_negative_int, positive_int
from adderquant.quant.config import QuantConfig
from adderquant.quant.qat_config import QATConfig
from adderquant.quant.report import json_ready
from adderquant.studies.experiment import Experiment
from adderquant.studies.plots import plot_accuracy_vs_bits
from adderquant.studies.reproduce import (
    METRICS,
    REPRODUCE_ROWS,
    accuracy_table,
    format_accuracy_table,
    over_seeds,
    select_rows,
)

OUTPUT_FILES = ("table.md", "results.json", "accuracy_vs_bits.png", "agreement_vs_bits.png",
                "kl_vs_bits.png")
QAT_FIELDS = ("epochs", "steps", "batch_size")
RUN_FIELDS = ("calib_batches", "calib_batch_size", "calib_pool", "bn_batches",
              "bias_correction_batches")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="accuracy table: FP, shared scale, the paper's method, per bit width",
        description="Quantize with every registered method at every bit width; report top-1 on "
        "the test subset and top-1 agreement with the float model on training images never "
        "used for calibration (the last --agreement-images; calibration draws from the first "
        "--calib-pool).",
    )
    add_model_args(p)
    p.add_argument("--out", default="runs/reproduce", metavar="DIR",
                   help="folder for table.md, results.json and the plots (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the result rows here")
    p.add_argument("--bits", type=bit_width, nargs="+", default=[8, 6, 5, 4, 3, 2],
                   help="bit widths (default: %(default)s)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="rows to run, or 'all' (default: "
                   + ", ".join(r.name for r in select_rows(None)) + "; on request: "
                   + ", ".join(r.name for r in REPRODUCE_ROWS if not r.default) + ")")
    p.add_argument("--agreement-images", type=non_negative_int, default=10000,
                   help="last training images used for the agreement column (default: 10000)")
    g = p.add_argument_group("calibration of every row (default: each row's method's own)")
    for name in RUN_FIELDS:
        add_field_flag(g, name, None)
    q = p.add_argument_group("quantization-aware training of the adderquant-qat row "
                             "(default: QATConfig's)")
    for name in QAT_FIELDS:
        q.add_argument("--qat-" + name.replace("_", "-"), dest="qat_" + name, type=positive_int,
                       default=None, help=f"{name.replace('_', ' ')} (default: "
                       f"{getattr(QATConfig(), name)})")
    seed = QuantConfig.__dataclass_fields__["seed"].default
    p.add_argument("--seed", type=int, nargs="+", default=[seed],
                   help="calibration seed(s); with several, every cell is the mean ± standard "
                   "deviation over them (default: %(default)s)")
    p.set_defaults(func=run, output_files=("json",), output_dirs={"out": OUTPUT_FILES},
                   config_fields=RUN_FIELDS)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = select_rows(args.methods)
    given = given_fields(args)
    model = build_model(args)
    exp = Experiment.load(model, dataset_name(args), args.data, args.limit,
                          agreement_images=args.agreement_images,
                          progress=not args.no_progress)
    configs = [c for r in rows for c in [r.configure(None, given)] if c is not None]
    for cfg in configs:
        exp.check_split(cfg)
    qat = {name: getattr(args, "qat_" + name) for name in QAT_FIELDS
           if getattr(args, "qat_" + name) is not None}
    results = over_seeds([accuracy_table(exp, rows, args.bits, {**given, "seed": seed}, qat)
                          for seed in args.seed])
    out = Path(args.out)
    n_test = sum(len(y) for _, y in exp.test)
    seeds = (f", mean ± sd over calibration seeds {', '.join(map(str, args.seed))}"
             if len(args.seed) > 1 else "")
    text = [f"Test top-1 (%) on the {n_test}-image test subset{seeds}:", "",
            format_accuracy_table(results, "top1"), "",
            f"Top-1 agreement (%) with the full-precision model on the {n_test} test images:",
            "", format_accuracy_table(results, "test_agreement")]
    if args.agreement_images:
        pools = sorted({cfg.calib_pool for cfg in configs})
        held_out = (f"on the last {args.agreement_images} training images (calibration: the "
                    f"first {', '.join(map(str, pools))})")
        text += ["", f"Top-1 agreement (%) with the full-precision model {held_out}:", "",
                 format_accuracy_table(results, "agreement"), "",
                 f"Mean KL divergence of the outputs from the full-precision model's "
                 f"(10^-3 nats) {held_out}:", "", format_accuracy_table(results, "kl")]
    text = "\n".join(text)
    write_bytes_atomic(out / "table.md", (text + "\n").encode())
    write_json_atomic(out / "results.json", json_ready(results))
    if args.json:
        write_json_atomic(args.json, json_ready(results))
    plot_accuracy_vs_bits(results, out / "accuracy_vs_bits.png")
    if args.agreement_images:
        plot_accuracy_vs_bits(results, out / "agreement_vs_bits.png", "agreement",
                              "agreement with full precision vs bits")
        plot_accuracy_vs_bits(results, out / "kl_vs_bits.png", "kl",
                              f"{METRICS['kl'][0]} vs bits")
    print(text)
    print(f"\nwrote {out}/table.md, results.json and plots in {time.perf_counter() - start:.0f} s")
    return 0
