"""``adderquant qat``: quantization-aware training of a post-training result (run here from the
float model, or read from ``ptq --out``), saved as the same kind of quantized model."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from adderquant._io import write_json_atomic
from adderquant.cli.common import build_model, dataset_name, normalisation, num_classes
from adderquant.cli.validate import bit_width, non_negative_int, positive_int, thread_count
from adderquant.data import TensorLoader, load_dataset
from adderquant.evaluate import evaluate
from adderquant.models import ADDER_MODELS
from adderquant.quant.config import AdderQuantConfig
from adderquant.quant.io import load_quantized, save_quantized
from adderquant.quant.ptq import CalibrationSet, quantize_with_report
from adderquant.quant.qat import qat
from adderquant.quant.qat_config import LOSSES, QATConfig
from adderquant.quant.registry import get_method, method_names
from adderquant.quant.report import json_ready

EVAL_BATCH = 250
_HELP = {
    "epochs": "passes over the training images (ignored with --steps)",
    "steps": "optimizer steps in all (overrides --epochs)",
    "batch_size": "training batch size",
    "lr": "Adam learning rate of the adder layers, in units of each layer's grid step",
    "step_lr": "Adam learning rate of the grid steps, relative to each step",
    "float_lr": "Adam learning rate of the float layers (first conv, classifier, BatchNorm)",
    "warmup": "first fraction of the steps with the learning rates rising linearly from 0",
    "loss": "kl: distillation from the float model's logits; ce: cross-entropy on labels",
    "temperature": "distillation temperature",
    "bn_refresh_batches": "batches re-estimating BatchNorm at the start and before the freeze",
    "bn_refresh_check": "keep refreshed BatchNorm statistics only where they lower the KL to "
    "the float model on the refresh images",
    "bn_freeze": "last fraction of the steps with BatchNorm frozen (1: throughout)",
    "true_gradient": "exact sign gradients through the adder op instead of AdderNet's",
    "holdout": "last training images never trained on (agreement and KL)",
    "eval_images": "held-out images scored after every epoch",
    "augment": "pad-4 crop + flip of the training images (default: where the dataset's "
    "training recipe has it: CIFAR)",
    "views": "distinct augmentations of the training images (teacher logits kept per view)",
    "seed": "seed of the data order and augmentation",
}
_TYPES = {"steps": positive_int, "holdout": non_negative_int, "eval_images": non_negative_int,
          "bn_refresh_batches": non_negative_int}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "qat", help="quantization-aware training of a quantized model",
        description="Quantize the float model after training (--method, --bits) or read a "
        "quantized model (--quantized), train it with straight-through gradients and "
        "distillation from the float model, save it as ptq --out does and print its test top-1 "
        "and its agreement and KL with the float model on held-out training images.",
    )
    p.add_argument("--model", default="resnet20", choices=ADDER_MODELS, help="architecture")
    p.add_argument("--checkpoint", default=None,
                   help="float state dict: the teacher and the start (default: the released "
                   "checkpoint of --model)")
    p.add_argument("--data", default=None, help="dataset root (default: as for ptq)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the model's)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="score only the first N test images (default: all)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--method", dest="ptq_method", default=AdderQuantConfig.method,
                   choices=method_names(),
                   help="post-training method of the start, with its own defaults (default: "
                   f"{AdderQuantConfig.method})")
    p.add_argument("--bits", dest="ptq_bits", type=bit_width, default=2,
                   help="bit width of weights and activations (default: 2)")
    p.add_argument("--quantized", metavar="FILE",
                   help="start from this saved quantized model (ptq --out) instead")
    p.add_argument("--out", metavar="FILE", help="write the trained quantized model here")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--state", metavar="FILE",
                   help="training state written (atomically) after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("training (defaults: QATConfig)")
    defaults = QATConfig()
    for f in fields(QATConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f"{_HELP[f.name]} (default: {default})"
        if isinstance(default, bool) or f.name == "augment":
            g.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
        elif f.name == "loss":
            g.add_argument(flag, choices=LOSSES, default=argparse.SUPPRESS, help=text)
        else:
            kind = _TYPES.get(f.name, type(default))
            g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    p.set_defaults(func=run, output_files=("out", "report", "state"))


def config_from_args(args: argparse.Namespace) -> QATConfig:
    return QATConfig.from_dict({f.name: getattr(args, f.name) for f in fields(QATConfig)
                                if f.name in vars(args)})


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = config_from_args(args)
    if args.resume and not args.state:
        raise ValueError("--resume needs --state FILE (the file an earlier run wrote)")
    dataset = dataset_name(args)
    show = not args.no_progress and not args.json
    seconds: dict[str, float] = {}
    if args.quantized:
        quantized, payload = load_quantized(args.quantized)
        if payload.get("model") != args.model or payload.get("num_classes") != num_classes(args):
            raise ValueError(f"{args.quantized} holds a {payload.get('model')} with "
                             f"{payload.get('num_classes')} classes, not {args.model} with "
                             f"{num_classes(args)}; pass the matching --model")
        start_config = payload.get("config", {})
    model = build_model(args)
    images, labels = load_dataset(dataset, args.data, train=True)
    if not args.quantized:
        ptq_cfg = get_method(args.ptq_method).config(bits=args.ptq_bits)
        if ptq_cfg.calib_pool > len(images) - cfg.holdout:
            raise ValueError(f"calibration draws from the first {ptq_cfg.calib_pool} training "
                             f"images, which overlap the last {cfg.holdout} held out; lower "
                             "--holdout")
        begin = time.perf_counter()
        calib = CalibrationSet.from_config(ptq_cfg, dataset, args.data)
        quantized, _ = quantize_with_report(model, ptq_cfg, calib, progress=show)
        seconds["ptq"] = time.perf_counter() - begin
        start_config = ptq_cfg.as_dict()
    begin = time.perf_counter()
    result, report = qat(model, quantized, cfg, images, labels, dataset, normalisation(args),
                         args.state, args.resume, progress=show)
    seconds["qat"] = time.perf_counter() - begin
    test_images, test_labels = load_dataset(dataset, args.data, train=False)
    if args.limit is not None:
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    scores = {}
    for name, m in (("ptq", quantized), ("qat", result)):
        loader = TensorLoader(test_images, test_labels, dataset, batch_size=EVAL_BATCH,
                              normalisation=normalisation(args))
        scores[name] = evaluate(m, loader, progress=False).top1
    seconds["total"] = time.perf_counter() - start
    report.update(model=args.model, dataset=dataset, start_config=start_config,
                  test_top1=scores["qat"], start_test_top1=scores["ptq"], test_images=len(
                      test_images), wall_seconds=seconds)
    if args.out:
        save_quantized(args.out, result, args.model, num_classes(args),
                       {"start": start_config, "qat": cfg.as_dict()}, json_ready(report))
    if args.report:
        write_json_atomic(args.report, json_ready(report))
    if args.json:
        print(json.dumps(json_ready({
            "model": args.model, "top1": scores["qat"], "start_top1": scores["ptq"],
            "agreement": report.get("agreement"), "kl": report.get("kl"),
            "start_agreement": report["start"].get("agreement"),
            "start_kl": report["start"].get("kl"), "steps": report["steps"],
            "changed_codes": report["changed_codes"], "bn_refresh": report["bn_refresh"],
            "seconds": seconds, "out": args.out, "config": cfg.as_dict(),
        })))
        return 0
    held = report["held_out_images"]
    print(f"{args.model} QAT on {dataset}: test top-1 {scores['ptq']:.2f} % -> "
          f"{scores['qat']:.2f} % ({len(test_images)} images)")
    if "kl" in report:
        print(f"held-out ({held} images): agreement {report['start']['agreement']:.2f} % -> "
              f"{report['agreement']:.2f} %, KL {1000 * report['start']['kl']:.2f} -> "
              f"{1000 * report['kl']:.2f} x10^-3 nats")
    print(f"weight codes changed by training: {100 * report['changed_codes']:.2f} %")
    print("  ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    if args.out:
        print(f"saved {args.out}")
    return 0
