"""The deployment package: ``model.json`` (graph, shapes, bit widths, version) beside
``model.safetensors`` (every tensor) and ``manifest.json`` (the SHA-256 of both), written
atomically under a folder lock and checked fully on load.

See docs/deployment.md for the format. Loading verifies the manifest (format, version and the
SHA-256 of both files), that every tensor the graph needs is present with the right dtype and
shape (and no other), that the shapes flow through the graph (every op gets the channels its
layer was built for, the classifier ends at 1x1), and the range of every integer tensor.
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

from adderquant._io import folder_lock, write_bytes_atomic
from adderquant.ops.requant import LIMIT_BITS, MAX_SHIFT

MAX_DIVISOR_BITS = 50
FRAC_BITS_RANGE = (24, 48)

FORMAT = "adderquant-integer-adder"
VERSION = 2
GRAPH_FILE = "model.json"
TENSOR_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
PACKAGE_FILES = (GRAPH_FILE, TENSOR_FILE, MANIFEST_FILE)

DTYPES = {"uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
          "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
OPS = ("stem", "float_to_codes", "float_to_fixed", "fixed_to_codes", "adder", "sums_to_codes",
       "sums_to_fixed", "head")
BN_FIELDS = ("bn_weight", "bn_bias", "bn_mean", "bn_var")
REEXPORT = "export the quantized model again (adderquant export MODEL --out DIR)"


class PackageError(ValueError):
    """A deployment package that is missing, corrupted, of another version or inconsistent."""


@dataclass
class Package:
    """``graph``: the content of model.json (without the checksum); ``tensors``: by name."""

    graph: dict
    tensors: dict[str, torch.Tensor]


def save_package(package: Package, out_dir: str | Path) -> Path:
    """Write ``model.safetensors``, ``model.json`` and last ``manifest.json`` (the SHA-256 of
    both) into ``out_dir``, holding its lock so that a concurrent export fails instead of
    mixing files."""
    validate(package)
    data = save_safetensors({k: v.contiguous() for k, v in package.tensors.items()})
    graph = (json.dumps(package.graph, indent=2) + "\n").encode()
    manifest = {"format": FORMAT, "version": VERSION,
                "sha256": {GRAPH_FILE: _sha256(graph), TENSOR_FILE: _sha256(data)}}
    with folder_lock(out_dir) as out:
        write_bytes_atomic(out / TENSOR_FILE, data)
        write_bytes_atomic(out / GRAPH_FILE, graph)
        write_bytes_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(data: bytes, path: Path) -> object:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path} is not valid JSON ({e}); the file is truncated or "
                           f"corrupted: {REEXPORT}") from e


def _check_format(obj: object, path: Path) -> None:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PackageError(f"{path} is not an {FORMAT} package file")
    if obj.get("version") != VERSION:
        raise PackageError(f"{path} has format version {obj.get('version')!r}; this adderquant "
                           f"reads version {VERSION}: {REEXPORT}")


def read_manifest(d: Path) -> dict[str, str]:
    """The SHA-256 per file recorded in ``d/manifest.json`` (checked for format and version)."""
    path = d / MANIFEST_FILE
    if not path.is_file():
        graph_path = d / GRAPH_FILE
        if graph_path.is_file() and (d / TENSOR_FILE).is_file():
            raise PackageError(f"{d} has no {MANIFEST_FILE}: it was written by an older "
                               f"adderquant (format version 1) or only in part; {REEXPORT}")
        raise PackageError(f"{d} is not a deployment package: it needs {', '.join(PACKAGE_FILES)}"
                           " (write one with `adderquant export MODEL --out DIR`)")
    manifest = _json(path.read_bytes(), path)
    _check_format(manifest, path)
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or set(sums) != {GRAPH_FILE, TENSOR_FILE}:
        raise PackageError(f"{path} must record the SHA-256 of {GRAPH_FILE} and {TENSOR_FILE}; "
                           f"{REEXPORT}")
    return sums


def load_package(directory: str | Path) -> Package:
    """Read and fully check a package written by :func:`save_package`."""
    d = Path(directory)
    sums = read_manifest(d)
    contents = {}
    for name in (GRAPH_FILE, TENSOR_FILE):
        path = d / name
        if not path.is_file():
            raise PackageError(f"{d} is not a complete deployment package: {name} is missing; "
                               f"{REEXPORT}")
        contents[name] = path.read_bytes()
        if _sha256(contents[name]) != sums[name]:
            raise PackageError(f"{path} does not match the SHA-256 recorded in {MANIFEST_FILE} "
                               f"(truncated, modified or from another export): {REEXPORT}")
    graph = _json(contents[GRAPH_FILE], d / GRAPH_FILE)
    _check_format(graph, d / GRAPH_FILE)
    try:
        tensors = load_safetensors(contents[TENSOR_FILE])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PackageError(f"{d / TENSOR_FILE} cannot be read ({e})") from e
    package = Package(graph, tensors)
    validate(package)
    return package


def validate(package: Package) -> None:
    """Check the graph and every tensor's dtype, shape and range; raise ``PackageError``."""
    try:
        spec = expected_tensors(package.graph)
        _check_graph(package.graph)
        _check_shapes(package.graph)
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


def _conv_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pair(value: object, what: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise PackageError(f"{what} must be a list of two integers, got {value!r}")
    return value[0], value[1]


def _check_shapes(graph: dict) -> None:
    """Follow the shape of every value through the graph: each op must get the channels and
    kind of value (float, fixed-point stream, codes of its layer, sums of its layer) it was
    built for, and the classifier must produce ``num_classes`` logits, so that a package that
    loads also runs."""
    layers = graph["layers"]
    frac = graph["fixed_frac_bits"]
    if not isinstance(frac, int) or not FRAC_BITS_RANGE[0] <= frac <= FRAC_BITS_RANGE[1]:
        raise PackageError(f"fixed_frac_bits must be an integer in "
                           f"{FRAC_BITS_RANGE[0]}..{FRAC_BITS_RANGE[1]}, got {frac!r}")
    geometry = {}
    for name, lay in layers.items():
        kernel = _pair(lay["kernel"], f"layer {name}: kernel")
        geometry[name] = (kernel, _pair(lay["stride"], f"layer {name}: stride"),
                          _pair(lay["padding"], f"layer {name}: padding"))
    c, h, w = (int(v) for v in graph["input_shape"])
    values: dict[str, tuple[str, str | None, tuple[int, int, int]]] = {
        "image": ("float", None, (c, h, w))}

    def expect(i: int, op: dict, key: str, kind: str, layer: str | None = None):
        got_kind, got_layer, shape = values[op[key]]
        if got_kind != kind or (layer is not None and got_layer != layer):
            want = f"{kind} of {layer}" if layer else kind
            have = f"{got_kind} of {got_layer}" if got_layer else got_kind
            raise PackageError(f"op {i} ({op['op']}) needs {want} as {key}, got {have}")
        return shape

    def channels(i: int, op: dict, layer: str, shape: tuple[int, int, int]) -> None:
        if layers[layer]["in_channels"] != shape[0]:
            raise PackageError(f"op {i} ({op['op']}): layer {layer} takes "
                               f"{layers[layer]['in_channels']} input channels but gets "
                               f"{shape[0]}; the package is inconsistent: {REEXPORT}")

    for i, op in enumerate(graph["ops"]):
        kind = op["op"]
        if kind in ("stem", "head"):
            x = expect(i, op, "input", "float" if kind == "stem" else "fixed")
            if kind == "head":
                pool = int(op["pool"])
                x = (x[0], x[1] - pool + 1, x[2] - pool + 1)
            k_out, k_in, kh, kw = (int(v) for v in op["weight_shape"])
            (sh, sw), (ph, pw) = _pair(op["stride"], "stride"), _pair(op["padding"], "padding")
            out = (k_out, _conv_size(x[1], kh, sh, ph), _conv_size(x[2], kw, sw, pw))
            if k_in != x[0] or min(out[1:]) < 1 or min(sh, sw) < 1:
                raise PackageError(f"op {i} ({kind}): weight {op['weight_shape']} does not fit "
                                   f"its input of shape {list(x)}; {REEXPORT}")
            if kind == "head" and (out[1:] != (1, 1) or k_out != graph["num_classes"]):
                raise PackageError(f"op {i} (head) gives {list(out)} instead of "
                                   f"{graph['num_classes']} logits; {REEXPORT}")
            result = ("float", None, out)
        elif kind == "float_to_fixed":
            result = ("fixed", None, expect(i, op, "input", "float"))
        elif kind in ("float_to_codes", "fixed_to_codes"):
            x = expect(i, op, "input", "float" if kind == "float_to_codes" else "fixed")
            channels(i, op, op["to"], x)
            result = ("codes", op["to"], x)
        elif kind == "adder":
            x = expect(i, op, "input", "codes", op["layer"])
            (kh, kw), (sh, sw), (ph, pw) = geometry[op["layer"]]
            out = (layers[op["layer"]]["out_channels"], _conv_size(x[1], kh, sh, ph),
                   _conv_size(x[2], kw, sw, pw))
            if min(out[1:]) < 1:
                raise PackageError(f"op {i} (adder): layer {op['layer']} gets a {x[1]}x{x[2]} "
                                   f"input, too small for its kernel; {REEXPORT}")
            result = ("sums", op["layer"], out)
        else:
            x = expect(i, op, "input", "sums", op["from"])
            if kind == "sums_to_codes":
                channels(i, op, op["to"], x)
                result = ("codes", op["to"], x)
            else:
                if op.get("residual") and expect(i, op, "residual", "fixed") != x:
                    raise PackageError(f"op {i} (sums_to_fixed): residual of shape "
                                       f"{list(values[op['residual']][2])} cannot be added to "
                                       f"{list(x)}; {REEXPORT}")
                result = ("fixed", None, x)
        values[op["output"]] = result


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
