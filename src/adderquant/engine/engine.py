"""The integer inference engine: runs a deployment package's graph on a batch of images.

Adder layers run as uint8 SAD with int32 sums (``sad_conv2d_packed_grids``, all grids of a layer
in one call); BatchNorm, ReLU, residual additions and requantization run in fixed point
(``requant``); only the first convolution and the classifier (pooling, 1x1 convolution,
BatchNorm) run in float32.

Threads: the float ops at both ends run on the whole batch with PyTorch's threads. The integer
ops between them run image-parallel: the batch is split into one part per thread and each
Python thread runs every integer op on its part with single-threaded kernels (they release the
GIL), ``chunk`` images at a time. No op waits for the other threads, and each thread's
intermediate tensors stay in its core's cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adderquant.engine.package import Package, load_package
from adderquant.ops.requant import (
    codes_from_float,
    codes_from_stream,
    codes_from_sums,
    float_to_stream,
    requant_fixed,
)
from adderquant.ops.sad import ConvGeometry, sad_conv2d_packed_grids
from adderquant.quant.grid import distinct_grids

FLOAT_OPS = ("stem", "head")


@dataclass
class Codes:
    """uint8 codes of a (C, H, W) tensor on each grid of its consuming layer, packed for that
    layer's geometry: (G, N, packed bytes)."""

    packed: torch.Tensor
    shape: tuple[int, int, int]


@dataclass
class _AdderLayer:
    """One layer's SAD operands by grid (groups with the same step and zero point share one
    grid, so their input codes are produced and read once): the filters of grid 0, then grid
    1, ..., their output channels, the number of filters and the padding code of each grid,
    and the first group on each grid."""

    weights: torch.Tensor
    channels: torch.Tensor
    filters: torch.Tensor
    pad_codes: torch.Tensor
    geometry: ConvGeometry
    out_channels: int
    grid_groups: torch.Tensor


class IntegerEngine:
    """``engine(images) -> logits`` for normalised float images (N, C, H, W)."""

    def __init__(self, package: Package, threads: int | None = None, chunk: int = 16) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of images, got {chunk}")
        self.package = package
        self.graph = package.graph
        self.t = package.tensors
        self.threads = threads
        self.chunk = chunk
        self.frac_bits = int(self.graph["fixed_frac_bits"])
        self.adders = {name: self._adder_layer(name) for name in self.graph["layers"]}
        self._grid_rows: dict[str, torch.Tensor] = {}
        ops = self.graph["ops"]
        self.first = next(i for i, op in enumerate(ops) if op["op"] not in FLOAT_OPS)
        self.last = max(i for i, op in enumerate(ops) if op["op"] not in FLOAT_OPS) + 1
        if any(op["op"] in FLOAT_OPS for op in ops[self.first:self.last]):
            raise ValueError("the package's float ops must come before and after its integer ops")
        self.last_use: dict[str, int] = {}
        for i, op in enumerate(ops):
            for value in (op["input"], op.get("residual")):
                if value:
                    self.last_use[value] = i

    def _adder_layer(self, name: str) -> _AdderLayer:
        lay = self.graph["layers"][name]
        codes = self.t[f"{name}.weight_codes"]
        zero = self.t[f"{name}.zero_point"]
        _, _, grid_of_group = distinct_grids(self.t[f"{name}.scale"], zero)
        grids = int(grid_of_group.max()) + 1
        first = torch.tensor([int(torch.nonzero(grid_of_group == j)[0]) for j in range(grids)])
        grid_of_channel = grid_of_group[self.t[f"{name}.group"].long()]
        channels = [torch.nonzero(grid_of_channel == j).flatten().to(torch.int32)
                    for j in range(grids)]
        order = torch.cat(channels)  # filters grid by grid
        return _AdderLayer(
            weights=codes[order.long()].contiguous(),
            channels=order,
            filters=torch.tensor([len(c) for c in channels], dtype=torch.int64),
            pad_codes=zero[first].to(torch.int32).contiguous(),
            geometry=ConvGeometry(tuple(lay["kernel"]), tuple(lay["stride"]),
                                  tuple(lay["padding"])),
            out_channels=lay["out_channels"],
            grid_groups=first,
        )

    def _per_grid(self, key: str, layer: str) -> torch.Tensor:
        """The rows of the per-group tensor ``key`` for the grids of ``layer`` (cached)."""
        cached = self._grid_rows.get(key)
        if cached is None:
            cached = self.t[key][self.adders[layer].grid_groups].contiguous()
            self._grid_rows[key] = cached
        return cached

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.graph["input_shape"])
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"the engine expects images of shape (N, {shape}), got "
                             f"{tuple(images.shape)}")
        if len(images) == 0:
            return torch.empty(0, self.graph["num_classes"])
        x = images.float()
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).flatten(1).any(1)
            raise ValueError(
                f"the engine takes finite images; {int(bad.sum())} of {len(x)} images hold NaN "
                f"or infinite pixels, or pixels beyond the float32 range (first: image "
                f"{int(bad.nonzero()[0])}); integer codes cannot represent them, so clean or drop "
                "those images"
            )
        values = self._run({"image": x}, 0, self.first)
        threads = max(1, min(self.threads or torch.get_num_threads(), len(images)))
        splits = {k: v.tensor_split(threads) for k, v in values.items()}
        parts = [{k: s[i] for k, s in splits.items()} for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(self._integer_part, parts))
        merged = {k: torch.cat([d[k] for d in done]) for k in done[0]}
        return self._run(merged, self.last, len(self.graph["ops"]))["logits"]

    def _integer_part(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The integer ops on one thread's images, ``chunk`` at a time."""
        n = len(next(iter(values.values())))
        outs = [self._run({k: v[i:i + self.chunk] for k, v in values.items()}, self.first,
                          self.last, threads=1) for i in range(0, n, self.chunk)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _run(self, values: dict, start: int, stop: int, threads: int | None = None) -> dict:
        """Ops ``start..stop-1`` on ``values``; returns the values still needed after them."""
        for i in range(start, stop):
            op = self.graph["ops"][i]
            inputs = [values[op["input"]]]
            if op.get("residual"):
                inputs.append(values[op["residual"]])
            values[op["output"]] = getattr(self, f"_{op['op']}")(op, *inputs, threads=threads)
            for name in (op["input"], op.get("residual")):
                if name and self.last_use.get(name) == i:
                    del values[name]
        return values

    # ---- ops --------------------------------------------------------------------------------

    def _float_conv_bn(self, kind: str, op: dict, x: torch.Tensor) -> torch.Tensor:
        t = self.t
        x = F.conv2d(x, t[f"{kind}.weight"], None, op["stride"], op["padding"])
        return F.batch_norm(x, t[f"{kind}.bn_mean"], t[f"{kind}.bn_var"], t[f"{kind}.bn_weight"],
                            t[f"{kind}.bn_bias"], False, 0.0, op["eps"])

    def _stem(self, op: dict, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        return torch.relu(self._float_conv_bn("stem", op, x))

    def _head(self, op: dict, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        x = F.avg_pool2d((x.double() * 2.0 ** -self.frac_bits).float(), op["pool"], 1)
        return self._float_conv_bn("head", op, x).flatten(1)

    def _float_to_codes(self, op: dict, x: torch.Tensor, threads: int | None) -> Codes:
        name = op["to"]
        packed = codes_from_float(x, self._per_grid(f"{name}.scale", name),
                                  self._per_grid(f"{name}.zero_point", name),
                                  self.graph["layers"][name]["bits"], self.adders[name].geometry,
                                  threads)
        return Codes(packed, tuple(x.shape[1:]))

    def _float_to_fixed(self, op: dict, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        return float_to_stream(x, self.frac_bits, threads)

    def _requant_params(self, op: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multipliers, offsets and shifts: per channel, or per grid of the consumer and
        channel for ops that produce codes."""
        p = op["params"]
        keys = (f"{p}.multiplier", f"{p}.offset", f"{p}.shift")
        if "to" in op:
            return tuple(self._per_grid(k, op["to"]) for k in keys)
        return tuple(self.t[k] for k in keys)

    def _fixed_to_codes(self, op: dict, x: torch.Tensor, threads: int | None) -> Codes:
        name = op["to"]
        packed = codes_from_stream(x, self._per_grid(f"{op['params']}.divisor", name),
                                   self._per_grid(f"{name}.zero_point", name),
                                   self.graph["layers"][name]["bits"],
                                   self.adders[name].geometry, threads)
        return Codes(packed, tuple(x.shape[1:]))

    def _sums_to_codes(self, op: dict, sums: torch.Tensor, threads: int | None) -> Codes:
        name = op["to"]
        packed = codes_from_sums(sums, *self._requant_params(op),
                                 self._per_grid(f"{name}.zero_point", name),
                                 self.graph["layers"][name]["bits"], bool(op["relu"]),
                                 self.adders[name].geometry, threads)
        return Codes(packed, tuple(sums.shape[1:]))

    def _sums_to_fixed(self, op: dict, sums: torch.Tensor, residual: torch.Tensor | None = None,
                       threads: int | None = None) -> torch.Tensor:
        return requant_fixed(sums, *self._requant_params(op), residual, bool(op["relu"]),
                             threads)

    def _adder(self, op: dict, codes: Codes, threads: int | None) -> torch.Tensor:
        layer = self.adders[op["layer"]]
        c, h, w = codes.shape
        n = codes.packed.shape[1]
        out = torch.empty(n, layer.out_channels, *layer.geometry.output_size(h, w),
                          dtype=torch.int32)
        return sad_conv2d_packed_grids(codes.packed, codes.shape, layer.weights, layer.filters,
                                       layer.geometry, layer.pad_codes, out, layer.channels,
                                       threads)


def load(directory: str | Path, threads: int | None = None) -> IntegerEngine:
    """The integer engine of the package in ``directory`` (checked fully on load)."""
    return IntegerEngine(load_package(directory), threads)
