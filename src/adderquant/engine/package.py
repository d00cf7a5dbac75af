"""The deployment package: ``model.json`` (graph, shapes, bit widths, version) beside
``model.safetensors`` (every tensor), written atomically and checked fully on load.

See docs/deployment.md for the format. Loading verifies the format name and version, the
SHA-256 of the tensor file recorded in ``model.json``, that every tensor the graph needs is
present with the right dtype and shape (and no other), and the range of every integer tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adderquant.cli.common import write_bytes_atomic, write_json_atomic
from adderquant.engine.requant import LIMIT_BITS, MAX_SHIFT

MAX_DIVISOR_BITS = 50

FORMAT = "adderquant-integer-adder"
VERSION = 1
GRAPH_FILE = "model.json"
TENSOR_FILE = "model.safetensors"

DTYPES = {"uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
          "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
OPS = ("stem", "float_to_codes", "float_to_fixed", "fixed_to_codes", "adder", "sums_to_codes",
       "sums_to_fixed", "head")
BN_FIELDS = ("bn_weight", "bn_bias", "bn_mean", "bn_var")


class PackageError(ValueError):
    """A deployment package that is missing, corrupted, of another version or inconsistent."""


@dataclass
class Package:
    """``graph``: the content of model.json (without the checksum); ``tensors``: by name."""

    graph: dict
    tensors: dict[str, torch.Tensor]


def save_package(package: Package, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` then ``model.json`` (holding its SHA-256) into ``out_dir``."""
    validate(package)
    out = Path(out_dir)
    data = save_safetensors({k: v.contiguous() for k, v in package.tensors.items()})
    write_bytes_atomic(out / TENSOR_FILE, data)
    write_json_atomic(out / GRAPH_FILE,
                      {**package.graph, "tensors_sha256": hashlib.sha256(data).hexdigest()})
    return out


def load_package(directory: str | Path) -> Package:
    """Read and fully check a package written by :func:`save_package`."""
    d = Path(directory)
    graph_path, tensor_path = d / GRAPH_FILE, d / TENSOR_FILE
    if not graph_path.is_file() or not tensor_path.is_file():
        raise PackageError(f"{d} is not a deployment package: it needs {GRAPH_FILE} and "
                           f"{TENSOR_FILE} (write one with `adderquant export MODEL --out DIR`)")
    try:
        graph = json.loads(graph_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{graph_path} is not valid JSON ({e}); the file is truncated or "
                           "corrupted: export the model again") from e
    if not isinstance(graph, dict) or graph.get("format") != FORMAT:
        raise PackageError(f"{graph_path} is not an {FORMAT} package description")
    if graph.get("version") != VERSION:
        raise PackageError(f"{graph_path} has format version {graph.get('version')!r}; this "
                           f"adderquant reads version {VERSION}: export the model again")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != graph.pop("tensors_sha256", None):
        raise PackageError(f"{tensor_path} does not match the SHA-256 recorded in {GRAPH_FILE} "
                           "(truncated, modified or from another export): export again")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PackageError(f"{tensor_path} cannot be read ({e})") from e
    package = Package(graph, tensors)
    validate(package)
    return package


def validate(package: Package) -> None:
    """Check the graph and every tensor's dtype, shape and range; raise ``PackageError``."""
    try:
        spec = expected_tensors(package.graph)
        _check_graph(package.graph)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if isinstance(e, PackageError):
            raise
        raise PackageError(f"{GRAPH_FILE} is malformed: {type(e).__name__} {e}") from e
    tensors = package.tensors
    missing = sorted(spec.keys() - tensors.keys())
    extra = sorted(tensors.keys() - spec.keys())
    if missing or extra:
        raise PackageError(f"tensors do not match the graph: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise PackageError(f"tensor {name}: expected {DTYPE_NAMES[dtype]} {list(shape)}, "
                               f"found {DTYPE_NAMES.get(t.dtype, t.dtype)} {list(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PackageError(f"tensor {name} holds NaN or infinite values")
    _check_ranges(package.graph, tensors)


def _bn_spec(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{f}": (torch.float32, (channels,)) for f in BN_FIELDS}


def expected_tensors(graph: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor the graph refers to."""
    spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    layers = graph["layers"]
    for name, lay in layers.items():
        kh, kw = lay["kernel"]
        spec[f"{name}.weight_codes"] = (torch.uint8,
                                        (lay["out_channels"], lay["in_channels"], kh, kw))
        spec[f"{name}.group"] = (torch.int32, (lay["out_channels"],))
        spec[f"{name}.scale"] = (torch.float32, (lay["groups"],))
        spec[f"{name}.zero_point"] = (torch.int32, (lay["groups"],))
    for op in graph["ops"]:
        kind = op["op"]
        if kind in ("stem", "head"):
            shape = tuple(int(s) for s in op["weight_shape"])
            spec[f"{kind}.weight"] = (torch.float32, shape)
            spec.update(_bn_spec(kind, shape[0]))
        elif kind == "fixed_to_codes":
            spec[f"{op['params']}.divisor"] = (torch.int64, (layers[op["to"]]["groups"],))
        elif kind == "sums_to_codes":
            shape = (layers[op["to"]]["groups"], layers[op["from"]]["out_channels"])
            spec.update(_requant_spec(op["params"], shape))
        elif kind == "sums_to_fixed":
            spec.update(_requant_spec(op["params"], (layers[op["from"]]["out_channels"],)))
    for name, (dtype, shape) in graph["fakequant"]["tensors"].items():
        spec[f"fakequant.{name}"] = (DTYPES[dtype], tuple(shape))
    return spec


def _requant_spec(prefix: str, shape: tuple[int, ...]) -> dict:
    return {f"{prefix}.multiplier": (torch.int64, shape), f"{prefix}.offset": (torch.int64, shape),
            f"{prefix}.shift": (torch.int32, shape)}


def _check_graph(graph: dict) -> None:
    layers = graph["layers"]
    for name, lay in layers.items():
        if not 2 <= lay["bits"] <= 8 or lay["groups"] < 1 or lay["weight_ratio"] not in (1, 2):
            raise PackageError(f"layer {name}: bits must be 2..8, groups >= 1, weight_ratio 1 "
                               f"or 2; got {lay}")
        if min(lay["stride"]) < 1 or min(lay["padding"]) < 0:
            raise PackageError(f"layer {name}: invalid stride/padding {lay}")
    defined = {"image"}
    for i, op in enumerate(graph["ops"]):
        if op["op"] not in OPS:
            raise PackageError(f"op {i}: unknown kind {op['op']!r} (known: {', '.join(OPS)})")
        inputs = [op["input"]] + ([op["residual"]] if op.get("residual") else [])
        for value in inputs:
            if value not in defined:
                raise PackageError(f"op {i} ({op['op']}) reads {value!r} before it is computed")
        for key in ("layer", "from", "to"):
            if key in op and op[key] not in layers:
                raise PackageError(f"op {i} ({op['op']}) refers to unknown layer {op[key]!r}")
        defined.add(op["output"])
    if not graph["ops"] or graph["ops"][-1]["output"] != "logits":
        raise PackageError("the graph must end with the op producing 'logits'")


def _check_ranges(graph: dict, tensors: dict[str, torch.Tensor]) -> None:
    for name, lay in graph["layers"].items():
        qmax = (1 << lay["bits"]) - 1
        codes = tensors[f"{name}.weight_codes"]
        if codes.numel() and int(codes.max()) > qmax:
            raise PackageError(f"{name}.weight_codes: code {int(codes.max())} out of range for "
                               f"{lay['bits']} bits (0..{qmax})")
        zero = tensors[f"{name}.zero_point"]
        if int(zero.min()) < 0 or int(zero.max()) > qmax:
            raise PackageError(f"{name}.zero_point: outside the code range 0..{qmax}")
        group = tensors[f"{name}.group"].long()
        if int(group.min()) < 0 or int(group.max()) >= lay["groups"] or (
                torch.bincount(group, minlength=lay["groups"]) == 0).any():
            raise PackageError(f"{name}.group: labels must cover 0..{lay['groups'] - 1}, each "
                               "group non-empty")
        if (tensors[f"{name}.scale"] <= 0).any():
            raise PackageError(f"{name}.scale: grid steps must be positive")
    for op in graph["ops"]:
        if op["op"] in ("stem", "head") and (tensors[f"{op['op']}.bn_var"] < 0).any():
            raise PackageError(f"{op['op']}.bn_var: variances must be non-negative")
        if op["op"] == "fixed_to_codes":
            d = tensors[f"{op['params']}.divisor"]
            if (d <= 0).any() or (d >= 1 << MAX_DIVISOR_BITS).any():
                raise PackageError(f"{op['params']}.divisor: divisors must lie in "
                                   f"1..2^{MAX_DIVISOR_BITS}")
        elif op["op"] in ("sums_to_codes", "sums_to_fixed"):
            _check_requant(graph, op, tensors)


def _check_requant(graph: dict, op: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Shifts in range, and multipliers and offsets small enough that ``M·s + O`` cannot
    overflow int64 for any sum the producing layer can make."""
    lay = graph["layers"][op["from"]]
    kh, kw = lay["kernel"]
    needed = (lay["in_channels"] * kh * kw * ((1 << lay["bits"]) - 1)).bit_length()
    bits = op["input_bits"]
    if not needed <= bits < LIMIT_BITS:
        raise PackageError(f"op {op['output']}: input_bits {bits} cannot bound the sums of "
                           f"{op['from']} ({needed} bits)")
    p = op["params"]
    shift, mult, off = (tensors[f"{p}.{f}"] for f in ("shift", "multiplier", "offset"))
    if int(shift.min()) < 0 or int(shift.max()) > MAX_SHIFT:
        raise PackageError(f"{p}.shift: shifts must lie in 0..{MAX_SHIFT}")
    for field, t, limit in (("multiplier", mult, LIMIT_BITS - bits), ("offset", off, LIMIT_BITS)):
        if ((t >= 1 << limit) | (t <= -(1 << limit))).any():
            raise PackageError(f"{p}.{field}: values must lie strictly within ±2^{limit}")
