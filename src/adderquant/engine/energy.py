"""Operation counts and energy per image of CNNs, AdderNets and quantized AdderNets.

Counting rules (per image, from one forward pass on a dummy input with module hooks):

- ``Conv2d`` / ``Linear``: one multiplication and one addition (accumulate) per term, float32;
  plus one addition per output if it has a bias. A term is one (output, input, tap) triple.
- ``Adder2d``: two float32 additions per term (subtract, accumulate) and one absolute value.
- ``QuantAdder2d`` (b bits, G groups): per term one b-bit integer subtraction, one absolute
  value and one accumulation at the accumulator width ``ceil(log2(K·(2^b−1)+1))`` bits
  (K = C_in·kH·kW terms per output, the widest exact sum); plus the quantization of its input
  onto each group grid: G × input elements × (one 32-bit multiply + one 32-bit add), the
  fixed-point requantization that produces the codes.
- ``QuantConv2d`` (a CNN convolution on b-bit codes, BatchNorm folded): per term one b-bit
  integer multiply and one accumulation at ``ceil(log2(K·2^(b−1)·(2^b−1)+1)) + 1`` bits (the
  widest signed sum of K products of a signed weight code and an unsigned input code); per
  output one 32-bit multiply and one 32-bit add (the per-channel rescale and the folded bias);
  plus the quantization of its input onto its grid: input elements × (one 32-bit multiply +
  one 32-bit add), as for an adder layer of one group.
- ``BatchNorm``: free when it follows a multiplicative layer (``Conv2d``/``Linear``: folded into
  its weights); otherwise one multiply and one add per element, float32 after a float layer and
  32-bit integer after a quantized one (the per-channel rescale of the integer sums).
- Residual additions (tensor additions outside every counted module): one addition per
  element, float32, or 32-bit integer in a model with quantized adder layers.
- Average pooling (module or functional): one addition per input element and one multiply per
  output, float32.
  Max pooling: one comparison, counted as an addition, per input element of each window.
- ReLU and reshapes: free (a sign test, data movement).

Energy per operation comes from an :class:`EnergyTable` (default: the 45 nm figures of
Horowitz 2014). Integer additions scale linearly with bit width, multiplications with its
square: between the table's widths (and from 0 bits, 0 pJ) an integer operation of n bits is
interpolated linearly in n (adds, abs) or n² (multiplies), and extrapolated proportionally past
the widest entry. Float operations need an exact entry (16 or 32 bits). ``abs`` costs nothing by
default (the subtraction's sign selects the result, a two's-complement negate folds into the
adder's carry-in); give the table an ``int_abs`` entry to charge it.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from adderquant.nn import Adder2d
from adderquant.quant import CodeRange, QuantAdder2d, replace_module
from adderquant.quant.cnn import QuantConv2d

# pJ per operation, 45 nm (Horowitz, ISSCC 2014), keyed by operation kind and bit width.
DEFAULT_TABLE: dict[str, dict[int, float]] = {
    "int_add": {8: 0.03, 32: 0.1},
    "int_mul": {8: 0.2, 32: 3.1},
    "float_add": {16: 0.4, 32: 0.9},
    "float_mul": {16: 1.1, 32: 3.7},
    "int_abs": {},
}
KINDS = tuple(DEFAULT_TABLE)


@dataclass(frozen=True)
class EnergyTable:
    """Energy (pJ) of each operation kind at the bit widths the table lists."""

    entries: dict[str, dict[int, float]] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_TABLE))

    @classmethod
    def from_json(cls, source: str | Path) -> EnergyTable:
        """The default table with the entries of a JSON object (``{"int_add": {"8": 0.03}}``),
        given inline or as the path of a file holding it, replacing those of the same kind."""
        text = str(source)
        inline = not isinstance(source, Path) and text.lstrip().startswith("{")
        path = "(inline JSON)" if inline else source
        try:
            raw = json.loads(text if inline else Path(source).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"energy table {path}: not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"energy table {path}: not a JSON text file") from e
        except OSError as e:
            raise ValueError(f"energy table {path}: cannot read it ({e.strerror or e}); give "
                             "a JSON file or an inline JSON object") from e
        if not isinstance(raw, dict):
            raise ValueError(f"energy table {path}: expected an object of operation kinds")
        entries = copy.deepcopy(DEFAULT_TABLE)
        for kind, widths in raw.items():
            if kind not in KINDS or not isinstance(widths, dict):
                raise ValueError(f"energy table {path}: unknown kind {kind!r} (choose from "
                                 f"{', '.join(KINDS)}, each mapping bit widths to pJ)")
            try:
                entries[kind] = {int(b): float(pj) for b, pj in widths.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"energy table {path}: {kind} must map integer bit widths "
                                 f"to numbers of pJ") from e
            if any(b < 1 or not pj >= 0 or math.isinf(pj) for b, pj in entries[kind].items()):
                raise ValueError(f"energy table {path}: {kind} needs positive widths and "
                                 "non-negative energies")
        return cls(entries)

    def energy(self, kind: str, bits: int) -> float:
        """pJ of one ``kind`` operation on ``bits``-bit operands."""
        widths = self.entries[kind]
        if not widths:
            return 0.0
        if kind.startswith("float"):
            if bits not in widths:
                raise ValueError(f"no {kind} energy for {bits}-bit floats; the table has "
                                 f"{sorted(widths)}")
            return widths[bits]
        power = 2 if kind == "int_mul" else 1
        xs = [0] + sorted(widths)
        ys = [0.0] + [widths[b] for b in xs[1:]]
        if bits >= xs[-1]:
            return ys[-1] * (bits / xs[-1]) ** power
        i = bisect.bisect_right(xs, bits)
        x0, x1 = xs[i - 1] ** power, xs[i] ** power
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (bits**power - x0) / (x1 - x0)


@dataclass
class LayerOps:
    """Operations of one counted module (or residual addition) per image."""

    name: str
    kind: str
    ops: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, bits: int, count: int) -> None:
        if count:
            self.ops[(op, bits)] += int(count)

    def energy_pj(self, table: EnergyTable) -> float:
        return sum(n * table.energy(op, bits) for (op, bits), n in self.ops.items())


def accumulator_bits(terms: int, bits: int) -> int:
    """Width of the widest exact sum of ``terms`` absolute differences of ``bits``-bit codes."""
    return max(1, math.ceil(math.log2(terms * ((1 << bits) - 1) + 1)))


def conv_accumulator_bits(terms: int, bits: int) -> int:
    """Width of the widest exact signed sum of ``terms`` products of a signed ``bits``-bit
    weight code and an unsigned ``bits``-bit input code."""
    largest = terms * (1 << (bits - 1)) * ((1 << bits) - 1)
    return math.ceil(math.log2(largest + 1)) + 1


def _terms(module: nn.Module, out: torch.Tensor) -> int:
    """(output, input, tap) triples of a convolution-like module for one image."""
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    if isinstance(module, QuantAdder2d):
        per_output = module.weight_codes[0].numel()
    elif isinstance(module, QuantConv2d):
        per_output = module.weight[0].numel()
    elif isinstance(module, Adder2d):
        per_output = module.adder[0].numel()
    else:
        per_output = module.weight[0].numel()
    return out[0].numel() * per_output


MULTIPLICATIVE = (nn.Conv2d, nn.Linear)
INTEGER = (QuantAdder2d, QuantConv2d)
COUNTED = MULTIPLICATIVE + INTEGER + (Adder2d, nn.modules.batchnorm._BatchNorm,
                            nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d)


class _Counter:
    """Forward hooks that tally the operations of every counted module in execution order."""

    def __init__(self, integer_residuals: bool) -> None:
        self.layers: list[LayerOps] = []
        self.depth = 0
        self.previous: nn.Module | None = None
        self.integer_residuals = integer_residuals

    def pre_hook(self, module: nn.Module, args) -> None:
        self.depth += 1

    def hook(self, name: str):
        def record(module: nn.Module, args, out: torch.Tensor) -> None:
            self.depth -= 1
            layer = LayerOps(name, type(module).__name__)
            self._count(module, args[0], out, layer)
            self.layers.append(layer)
            self.previous = module
        return record

    def _count(self, m: nn.Module, x: torch.Tensor, out: torch.Tensor, layer: LayerOps) -> None:
        elems = out[0].numel()
        if isinstance(m, MULTIPLICATIVE):
            terms = _terms(m, out)
            layer.add("float_mul", 32, terms)
            layer.add("float_add", 32, terms + (elems if m.bias is not None else 0))
        elif isinstance(m, QuantAdder2d):
            terms = _terms(m, out)
            b = m.bits
            layer.add("int_add", b, terms)
            layer.add("int_abs", b, terms)
            layer.add("int_add", accumulator_bits(m.weight_codes[0].numel(), b), terms)
            layer.add("int_mul", 32, m.num_groups * x[0].numel())
            layer.add("int_add", 32, m.num_groups * x[0].numel())
        elif isinstance(m, QuantConv2d):
            terms = _terms(m, out)
            layer.add("int_mul", m.bits, terms)
            layer.add("int_add", conv_accumulator_bits(m.weight[0].numel(), m.bits), terms)
            for op in ("int_mul", "int_add"):
                layer.add(op, 32, elems + x[0].numel())
        elif isinstance(m, Adder2d):
            terms = _terms(m, out)
            layer.add("float_add", 32, 2 * terms)
            layer.add("int_abs", 32, terms)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not isinstance(self.previous, MULTIPLICATIVE):
                kind = "int" if isinstance(self.previous, QuantAdder2d) else "float"
                layer.add(f"{kind}_mul", 32, elems)
                layer.add(f"{kind}_add", 32, elems)
        elif isinstance(m, nn.MaxPool2d):
            layer.add("float_add", 32, elems * math.prod(_pair(m.kernel_size)))
        else:
            _count_average_pool(layer, x, out)

    def functional_pool(self, x: torch.Tensor, out: torch.Tensor) -> None:
        layer = LayerOps(f"pool{sum(lo.kind == 'pool' for lo in self.layers)}", "pool")
        _count_average_pool(layer, x, out)
        self.layers.append(layer)

    def residual(self, out: torch.Tensor) -> None:
        layer = LayerOps(f"residual{sum(lo.kind == 'add' for lo in self.layers)}", "add")
        layer.add("int_add" if self.integer_residuals else "float_add", 32, out[0].numel())
        self.layers.append(layer)


def _count_average_pool(layer: LayerOps, x: torch.Tensor, out: torch.Tensor) -> None:
    layer.add("float_add", 32, x[0].numel())
    layer.add("float_mul", 32, out[0].numel())


_POOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d}
_ADD_FUNCTIONS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
                  torch.Tensor.__iadd__, torch.Tensor.__radd__}


class _ResidualAdds(TorchFunctionMode):
    """Counts additions of two same-shaped tensors and functional average pooling made
    outside every counted module."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (func in _ADD_FUNCTIONS and self.counter.depth == 0 and len(tensors) == 2
                and tensors[0].shape == tensors[1].shape):
            self.counter.residual(out)
        elif func in _POOL_FUNCTIONS and self.counter.depth == 0:
            self.counter.functional_pool(tensors[0], out)
        return out


@torch.no_grad()
def count_ops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> list[LayerOps]:
    """Operations per image of every counted module and residual addition of ``model``."""
    if input_shape[0] != 1:
        raise ValueError("count operations on one image: input_shape must start with 1")
    integer = any(isinstance(m, INTEGER) for m in model.modules())
    counter = _Counter(integer_residuals=integer)
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, COUNTED):
            handles.append(m.register_forward_pre_hook(counter.pre_hook))
            handles.append(m.register_forward_hook(counter.hook(name)))
    was_training = model.training
    model.eval()
    try:
        with _ResidualAdds(counter):
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counter.layers


def summarize(layers: list[LayerOps], table: EnergyTable) -> dict:
    """Totals per operation kind and width, and energy per image (µJ)."""
    totals: dict[str, int] = defaultdict(int)
    for layer in layers:
        for (op, bits), n in layer.ops.items():
            totals[f"{op}{bits}"] += n
    return {
        "ops": dict(sorted(totals.items())),
        "additions": sum(n for k, n in totals.items() if "_add" in k),
        "multiplications": sum(n for k, n in totals.items() if "_mul" in k),
        "energy_uj": sum(layer.energy_pj(table) for layer in layers) / 1e6,
        "layers": [{"name": lo.name, "kind": lo.kind,
                    "ops": {f"{op}{bits}": n for (op, bits), n in sorted(lo.ops.items())},
                    "energy_pj": lo.energy_pj(table)} for lo in layers],
    }


def cnn_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``Adder2d`` replaced by a ``Conv2d`` of the same shape."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Adder2d):
            replace_module(twin, name, nn.Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, bias=m.bias is not None))
    return twin


def quantized_twin(
    model: nn.Module, bits: int, groups: int = 4, weight_ratio: int = 1
) -> nn.Module:
    """A copy of ``model`` with every ``Adder2d`` replaced by a ``QuantAdder2d`` of ``bits`` bits
    and ``groups`` output-channel groups (placeholder grids: only shapes matter for counting)."""
    twin = copy.deepcopy(model)
    codes = CodeRange(bits, weight_ratio)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Adder2d):
            g = min(groups, m.out_channels)
            replace_module(twin, name, QuantAdder2d.from_float(
                m, torch.arange(m.out_channels) % g, torch.ones(g),
                torch.zeros(g, dtype=torch.int32), codes))
    return twin
