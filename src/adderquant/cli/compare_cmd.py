"""``adderquant compare``: quantized adder ResNet against quantized convolutional ResNet at every
bit width: accuracy, agreement and KL against each family's float model, operations and energy
per image, with the Pareto front of accuracy against energy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch import nn

from adderquant._io import write_bytes_atomic, write_json_atomic
from adderquant.cli.common import add_model_args, build_model, dataset_name, normalisation
from adderquant.cli.config_args import add_field_flag, given_fields
from adderquant.cli.energy_cmd import parse_table
from adderquant.cli.validate import bit_width, non_negative_int, positive_int
from adderquant.data import NORMALISATION
from adderquant.engine.energy import EnergyTable
from adderquant.models import MODEL_NAMES, model_record
from adderquant.quant.cnn import CNN_METHODS, CNNPTQConfig
from adderquant.quant.config import QuantConfig, field_names
from adderquant.quant.report import json_ready
from adderquant.studies.comparison import (
    ADDER_DEFAULT,
    Renormalize,
    adder_rows,
    cnn_rows,
    format_comparison,
    format_top1_by_bits,
    plot_accuracy_vs_bits,
    plot_accuracy_vs_energy,
)
from adderquant.studies.experiment import FULL_PRECISION, Experiment
from adderquant.studies.reproduce import REPRODUCE_ROWS, select_rows

AGREEMENT_IMAGES = 10000  # the held-out training images
OUTPUT_FILES = ("table.md", "results.json", "accuracy_vs_bits.png", "accuracy_vs_energy.png")
CNN_MODELS = tuple(name for name in MODEL_NAMES if not model_record(name).adder)
RUN_FIELDS = ("calib_batches", "calib_batch_size", "calib_pool", "report_images", "bn_batches",
              "bias_correction_batches")
# One calibration pass shared by every adder row: the adderquant method's own 2 batches of 128
# images, 128 of them kept per layer. --own-calibration gives each row its method's defaults
# instead (202 batches for qssf, qssf-repaired and paper), as the documented table was run.
SHARED_CALIBRATION = {"calib_batches": 2, "report_images": 128}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="quantized AdderNet vs quantized CNN: accuracy, energy, Pareto front",
        description="Quantize the adder model with the reproduce rows and its convolutional "
        "twin with the CNN methods at every bit width; report test top-1, agreement and KL "
        "against each family's float model on the held-out training images, and operations "
        "and energy per image (45 nm).",
    )
    add_model_args(p)
    p.add_argument("--cnn-model", default="resnet20-cnn", choices=CNN_MODELS,
                   help="the convolutional model (default: %(default)s)")
    p.add_argument("--cnn-checkpoint", default=None,
                   help="its state dict (default: its released checkpoint)")
    p.add_argument("--bits", type=bit_width, nargs="+", default=[8, 6, 5, 4, 3, 2],
                   help="bit widths (default: %(default)s)")
    adder_choices = [r.name for r in REPRODUCE_ROWS if r.bits is not None]
    p.add_argument("--adder-methods", nargs="*", default=list(ADDER_DEFAULT),
                   choices=adder_choices, metavar="NAME",
                   help=f"adder rows (default: {' '.join(ADDER_DEFAULT)}; choices: "
                   f"{', '.join(adder_choices)})")
    p.add_argument("--cnn-methods", nargs="*", default=list(CNN_METHODS),
                   choices=list(CNN_METHODS), metavar="NAME",
                   help=f"CNN methods (default and choices: {' '.join(CNN_METHODS)})")
    p.add_argument("--agreement-images", type=non_negative_int, default=AGREEMENT_IMAGES,
                   help="last training images of the agreement and KL columns, never "
                   "calibrated on (default: %(default)s; each family's float outputs on them "
                   "are computed once)")
    g = p.add_argument_group(
        "calibration of every adder row (default: one pass shared by all, "
        + ", ".join(f"{k}={v}" for k, v in SHARED_CALIBRATION.items())
        + "; else each method's own); the CNN draws from the same pool with the same batch size")
    g.add_argument("--own-calibration", action="store_true",
                   help="each adder row calibrates with its method's own defaults (202 "
                   "batches for qssf, qssf-repaired and paper), as docs/comparison.md's table "
                   "was run; slower")
    for name in RUN_FIELDS:
        add_field_flag(g, name, None)
    p.add_argument("--seed", type=int, default=QuantConfig.__dataclass_fields__["seed"].default,
                   help="calibration seed of both families (default: %(default)s)")
    p.add_argument("--cnn-calib-batches", type=positive_int,
                   default=CNNPTQConfig.calib_batches,
                   help="calibration batches of the CNN (default: %(default)s)")
    p.add_argument("--energy-table", type=parse_table, default=None, metavar="JSON",
                   help="energy per operation in pJ (as `adderquant energy --table`)")
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="folder for table.md, results.json and the plots "
                   "(default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the result rows here")
    p.set_defaults(func=run, output_files=("json",), output_dirs={"out": OUTPUT_FILES},
                   config_fields=RUN_FIELDS)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if len(set(args.bits)) != len(args.bits):
        raise ValueError(f"--bits lists a width twice: {args.bits}")
    dataset = dataset_name(args)
    if model_record(args.cnn_model).dataset != dataset:
        raise ValueError(f"--cnn-model {args.cnn_model} is trained on "
                         f"{model_record(args.cnn_model).dataset}, not {dataset}")
    table = args.energy_table or EnergyTable()
    progress = not args.no_progress
    adder = build_model(args)
    exp = Experiment.load(adder, dataset, args.data, args.limit,
                          agreement_images=args.agreement_images, progress=progress)
    shared = {} if args.own_calibration else SHARED_CALIBRATION
    overrides = {**shared, **given_fields(args), "seed": args.seed}
    for row in select_rows([FULL_PRECISION, *args.adder_methods]):
        cfg = row.configure(None, overrides)
        if cfg is not None:
            exp.check_split(cfg)
    calibration = QuantConfig(**{k: v for k, v in overrides.items()
                                 if k in field_names(QuantConfig)})
    cnn_args = argparse.Namespace(**{**vars(args), "model": args.cnn_model,
                                     "checkpoint": args.cnn_checkpoint})
    # the experiment's batches carry the dataset's normalisation; the CNN was trained on others
    renormalize = Renormalize(NORMALISATION[dataset], normalisation(cnn_args))
    cnn_model = nn.Sequential(renormalize, build_model(cnn_args)).eval()
    cnn_exp = Experiment(cnn_model, exp.train_images, exp.train_labels, exp.test, dataset,
                         agreement_images=args.agreement_images, progress=progress)
    input_shape = model_record(args.model).input_size
    rows = adder_rows(exp, args.adder_methods, args.bits, overrides, input_shape, table)
    cnn_cfg = CNNPTQConfig(calib_batches=args.cnn_calib_batches, seed=args.seed)
    rows += cnn_rows(cnn_exp, args.cnn_methods, args.bits, calibration, cnn_cfg, input_shape,
                     table, progress=progress)
    n_test = sum(len(y) for _, y in exp.test)
    text = [f"Test top-1 (%) on the {n_test}-image test subset:", "",
            format_top1_by_bits(rows), "",
            "Every row: test top-1; top-1 agreement and mean KL divergence of the outputs "
            f"against the family's float model on the last {args.agreement_images} training "
            "images; energy and operations per image (45 nm); * on the Pareto front of "
            "top-1 against energy:", "", format_comparison(rows)]
    text = "\n".join(text)
    out = Path(args.out)
    write_bytes_atomic(out / "table.md", (text + "\n").encode())
    write_json_atomic(out / "results.json", json_ready(rows))
    if args.json:
        write_json_atomic(args.json, json_ready(rows))
    plot_accuracy_vs_bits(rows, out / "accuracy_vs_bits.png")
    plot_accuracy_vs_energy(rows, out / "accuracy_vs_energy.png")
    print(text)
    print(f"\nwrote {out}/table.md, results.json and plots in {time.perf_counter() - start:.0f} s")
    return 0
