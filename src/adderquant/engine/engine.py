"""The integer inference engine: runs a deployment package's graph on a batch of images.

Adder layers run as uint8 SAD with int32 sums (``sad_conv2d``); BatchNorm, ReLU, residual
additions and requantization run in fixed point (``requant``); only the first convolution and
the classifier (pooling, 1x1 convolution, BatchNorm) run in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adderquant.engine.package import Package, load_package
from adderquant.engine.requant import (
    codes_from_float,
    codes_from_stream,
    codes_from_sums,
    requant_fixed,
)
from adderquant.engine.sad import ConvGeometry, sad_conv2d_packed


@dataclass
class Codes:
    """uint8 codes of a (C, H, W) tensor on each grid of its consuming layer, packed for that
    layer's geometry: (G, N, packed bytes)."""

    packed: torch.Tensor
    shape: tuple[int, int, int]


@dataclass
class _AdderLayer:
    """One layer's SAD operands, split by group: filters, output channels, padding code."""

    weights: list[torch.Tensor]
    channels: list[torch.Tensor]
    pad_codes: list[int]
    geometry: ConvGeometry
    out_channels: int


class IntegerEngine:
    """``engine(images) -> logits`` for normalised float images (N, C, H, W)."""

    def __init__(self, package: Package, threads: int | None = None) -> None:
        self.package = package
        self.graph = package.graph
        self.t = package.tensors
        self.threads = threads
        self.frac_bits = int(self.graph["fixed_frac_bits"])
        self.adders = {name: self._adder_layer(name) for name in self.graph["layers"]}
        self.last_use = {}
        for i, op in enumerate(self.graph["ops"]):
            for value in (op["input"], op.get("residual")):
                if value:
                    self.last_use[value] = i

    def _adder_layer(self, name: str) -> _AdderLayer:
        lay = self.graph["layers"][name]
        codes = self.t[f"{name}.weight_codes"]
        group = self.t[f"{name}.group"]
        channels = [torch.nonzero(group == g).flatten().to(torch.int32)
                    for g in range(lay["groups"])]
        return _AdderLayer(
            weights=[codes[c.long()].contiguous() for c in channels],
            channels=channels,
            pad_codes=[int(z) for z in self.t[f"{name}.zero_point"]],
            geometry=ConvGeometry(tuple(lay["kernel"]), tuple(lay["stride"]),
                                  tuple(lay["padding"])),
            out_channels=lay["out_channels"],
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.graph["input_shape"])
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"the engine expects images of shape (N, {shape}), got "
                             f"{tuple(images.shape)}")
        values: dict[str, torch.Tensor | Codes] = {"image": images.float()}
        for i, op in enumerate(self.graph["ops"]):
            inputs = [values[op["input"]]]
            if op.get("residual"):
                inputs.append(values[op["residual"]])
            values[op["output"]] = getattr(self, f"_{op['op']}")(op, *inputs)
            for name in (op["input"], op.get("residual")):
                if name and self.last_use.get(name) == i:
                    del values[name]
        return values["logits"]

    # ---- ops --------------------------------------------------------------------------------

    def _float_conv_bn(self, kind: str, op: dict, x: torch.Tensor) -> torch.Tensor:
        t = self.t
        x = F.conv2d(x, t[f"{kind}.weight"], None, op["stride"], op["padding"])
        return F.batch_norm(x, t[f"{kind}.bn_mean"], t[f"{kind}.bn_var"], t[f"{kind}.bn_weight"],
                            t[f"{kind}.bn_bias"], False, 0.0, op["eps"])

    def _stem(self, op: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._float_conv_bn("stem", op, x))

    def _head(self, op: dict, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d((x.double() * 2.0 ** -self.frac_bits).float(), op["pool"], 1)
        return self._float_conv_bn("head", op, x).flatten(1)

    def _float_to_codes(self, op: dict, x: torch.Tensor) -> Codes:
        name = op["to"]
        lay = self.graph["layers"][name]
        packed = codes_from_float(x, self.t[f"{name}.scale"], self.t[f"{name}.zero_point"],
                                  lay["bits"], self.adders[name].geometry, self.threads)
        return Codes(packed, tuple(x.shape[1:]))

    def _float_to_fixed(self, op: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.double() * 2.0 ** self.frac_bits).to(torch.int64)

    def _requant_params(self, op: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = op["params"]
        return self.t[f"{p}.multiplier"], self.t[f"{p}.offset"], self.t[f"{p}.shift"]

    def _fixed_to_codes(self, op: dict, x: torch.Tensor) -> Codes:
        name = op["to"]
        packed = codes_from_stream(x, self.t[f"{op['params']}.divisor"],
                                   self.t[f"{name}.zero_point"],
                                   self.graph["layers"][name]["bits"],
                                   self.adders[name].geometry, self.threads)
        return Codes(packed, tuple(x.shape[1:]))

    def _sums_to_codes(self, op: dict, sums: torch.Tensor) -> Codes:
        name = op["to"]
        packed = codes_from_sums(sums, *self._requant_params(op), self.t[f"{name}.zero_point"],
                                 self.graph["layers"][name]["bits"], bool(op["relu"]),
                                 self.adders[name].geometry, self.threads)
        return Codes(packed, tuple(sums.shape[1:]))

    def _sums_to_fixed(
        self, op: dict, sums: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        return requant_fixed(sums, *self._requant_params(op), residual, bool(op["relu"]),
                             self.threads)

    def _adder(self, op: dict, codes: Codes) -> torch.Tensor:
        layer = self.adders[op["layer"]]
        c, h, w = codes.shape
        n = codes.packed.shape[1]
        out = torch.empty(n, layer.out_channels, *layer.geometry.output_size(h, w),
                          dtype=torch.int32)
        for g, (weights, channels, pad) in enumerate(
                zip(layer.weights, layer.channels, layer.pad_codes, strict=True)):
            sad_conv2d_packed(codes.packed[g], codes.shape, weights, layer.geometry, pad,
                              out=out, out_index=channels, threads=self.threads)
        return out


def load(directory: str | Path, threads: int | None = None) -> IntegerEngine:
    """The integer engine of the package in ``directory`` (checked fully on load)."""
    return IntegerEngine(load_package(directory), threads)
