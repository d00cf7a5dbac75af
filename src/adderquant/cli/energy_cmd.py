"""``adderquant energy``: operations and energy per image of a CNN, an AdderNet and quantized
AdderNets of the same architecture; optionally a plot of accuracy against energy."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from torch import nn

from adderquant._io import check_output_file, write_bytes_atomic
from adderquant.cli.validate import positive_int
from adderquant.engine.energy import (
    EnergyTable,
    cnn_twin,
    count_ops,
    quantized_twin,
    summarize,
)
from adderquant.models import ADDER_MODELS, create_model, model_record


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("energy", help="operation counts and energy per image (45 nm table)")
    p.add_argument("--model", default="resnet20", choices=ADDER_MODELS, help="architecture")
    p.add_argument("--bits", type=parse_bits, default="8,6,5,4,3,2",
                   help="comma-separated bit widths of the quantized AdderNets")
    p.add_argument("--groups", type=positive_int, default=4,
                   help="output-channel groups per layer")
    p.add_argument("--table", type=parse_table, default=None, metavar="JSON",
                   help='energy per operation in pJ, inline e.g. {"int_add": {"8": 0.03, '
                        '"32": 0.1}} or the path of a JSON file holding it; kinds not given '
                        "keep the default 45 nm figures")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="results.json (a list of rows with method, bits, top1) to plot "
                        "against energy")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="where to save the plot (default: energy_accuracy.png beside --results)")
    p.add_argument("--layers", action="store_true", help="also print every layer's operations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, output_files=("plot",))


def parse_bits(text: str) -> list[int]:
    """An argparse type: comma-separated bit widths from 2 to 8."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"must list widths from 2 to 8, got {text!r}")
    return bits


def parse_table(text: str) -> EnergyTable:
    """An argparse type: an energy table, inline JSON or the path of a JSON file."""
    try:
        return EnergyTable.from_json(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_variants(name: str, bits: list[int], groups: int) -> dict[str, nn.Module]:
    """The CNN twin, the float AdderNet and one quantized AdderNet per bit width."""
    adder = create_model(name)
    variants = {"cnn-fp32": cnn_twin(adder), "adder-fp32": adder}
    for b in bits:
        variants[f"adder-int{b}"] = quantized_twin(adder, b, groups)
    return variants


def run(args: argparse.Namespace) -> int:
    table = args.table or EnergyTable()
    plot = Path(args.plot) if args.plot else None
    if args.results and plot is None:
        plot = Path(args.results).with_name("energy_accuracy.png")
        check_output_file(plot)
    shape = (1, *model_record(args.model).input_size)
    rows = {name: summarize(count_ops(m, shape), table)
            for name, m in model_variants(args.model, args.bits, args.groups).items()}
    report = {"model": args.model, "groups": args.groups, "table_pj": table.entries,
              "models": rows}
    if args.results:
        report["plot"] = str(plot_results(args.results, plot, rows))
    if args.json:
        if not args.layers:
            for r in rows.values():
                r.pop("layers")
        print(json.dumps(report, indent=2))
        return 0
    cnn = rows["cnn-fp32"]["energy_uj"]
    print(f"{args.model}, one {shape[2]}x{shape[3]} image, {args.groups} groups per quantized "
          "layer; energy from the 45 nm table (see docs/deployment.md)")
    print(f"{'model':<12} {'adds (M)':>10} {'mults (M)':>10} {'energy (uJ)':>12} {'vs CNN':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['additions'] / 1e6:10.2f} {r['multiplications'] / 1e6:10.2f} "
              f"{r['energy_uj']:12.3f} {cnn / r['energy_uj']:7.1f}x")
        if args.layers:
            for layer in r["layers"]:
                ops = ", ".join(f"{k} {v}" for k, v in layer["ops"].items()) or "folded"
                print(f"    {layer['name']:<24} {layer['energy_pj'] / 1e6:9.4f} uJ  {ops}")
    if args.results:
        print(f"plot: {report['plot']}")
    return 0


def energy_of_row(row: dict, rows: dict[str, dict]) -> float:
    """Energy of a results row: a CNN if its method names one, the float AdderNet at 16 bits
    or more (or none given), else the quantized AdderNet of its bit width."""
    method = str(row.get("method", ""))
    bits = row.get("bits")
    if "cnn" in method.lower():
        return rows["cnn-fp32"]["energy_uj"]
    if bits is None or int(bits) >= 16:
        return rows["adder-fp32"]["energy_uj"]
    key = f"adder-int{int(bits)}"
    if key not in rows:
        raise ValueError(f"results row {row} has {bits} bits; add it to --bits")
    return rows[key]["energy_uj"]


def plot_results(results: str, out: Path, rows: dict[str, dict]) -> Path:
    """Plot top-1 against energy per image, one series per method; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(results)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--results {path}: not valid JSON ({e})") from e
    except UnicodeDecodeError:
        raise ValueError(f"--results {path}: not a text file (expected results.json, a list of "
                         "rows with method, bits, top1)") from None
    except OSError as e:
        raise ValueError(f"--results {path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, list) or not all(
            isinstance(r, dict) and {"method", "top1"} <= r.keys() for r in data):
        raise ValueError(f"--results {path}: expected a list of objects with method, bits, top1")
    series: dict[str, list[tuple[float, float, object]]] = {}
    for row in data:
        series.setdefault(str(row["method"]), []).append(
            (energy_of_row(row, rows), float(row["top1"]), row.get("bits")))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
        for e, acc, bits in points:
            if bits is not None:
                ax.annotate(f"{bits}b", (e, acc), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("energy per image (uJ, 45 nm)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(out, buf.getvalue())
    return out
