"""Lower a quantized adder ResNet (CIFAR layout, ``QuantAdder2d`` layers) to the integer graph of
a deployment package, and rebuild its fake-quant model from the package.

Integer arithmetic (docs/deployment.md has the derivation):

- an adder layer with groups g(t), steps Δ_g and zero points z_g computes the uint8 SAD
  ``s_t = Σ|q_x − v'|`` where ``v' = clamp(r·q_w, 0, 2^b − 1)``; clamping is lossless because
  every input code (and the padding code z_g) lies in ``[0, 2^b − 1]``, and the removed
  distance ``D_t = Σ|r·q_w − v'|`` joins the offset. The layer output is
  ``y_t = −Δ_g·(s_t + D_t) + clamp_bias_t + bias_t``;
- BatchNorm (``a_t·y + c_t``), ReLU and the next layer's quantization fold into one fixed-point
  requantization per (next group, channel): ``q = clamp(relu(round(m·s + o)) + z', 0, 2^b' − 1)``;
- residual streams are int64 in units of ``2^−F`` (F = ``fixed_frac_bits``); a block's output is
  ``relu(round(m·s + o) + residual)``, and the next layers' codes are ``round(X / D_g) + z_g``
  with the integer divisor ``D_g = Δ_g·2^F`` (exact: Δ_g is a float32).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch import nn

from adderquant.engine.package import (
    DTYPE_NAMES,
    FORMAT,
    MAX_DIVISOR_BITS,
    VERSION,
    Package,
    PackageError,
    save_package,
)
from adderquant.models import create_model, model_record
from adderquant.models.checkpoint import state_mismatch
from adderquant.models.resnet_cifar import BasicBlock, CifarResNet
from adderquant.ops.requant import fixed_point
from adderquant.quant import CodeRange, QuantAdder2d, replace_module
from adderquant.quant.grid import byte_weights

FRAC_BITS = 40


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """``(a, c)`` with ``bn(y) = a·y + c`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm layers need running statistics (track_running_stats=True)")
    a = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + bn.eps)
    return a, _f64(bn.bias) - a * _f64(bn.running_mean)


class _Lowering:
    """Collects the ops, tensors and layer descriptions of one integer graph."""

    def __init__(self, frac_bits: int) -> None:
        self.frac_bits = frac_bits
        self.ops: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, dict] = {}
        self.output_affine: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.sum_bits: dict[str, int] = {}
        self.count = 0

    def value(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def add_layer(self, name: str, layer: QuantAdder2d) -> None:
        codes = layer.codes
        qmax = codes.act_max
        if layer.dilation != (1, 1):
            raise ValueError(f"{name}: the integer engine supports dilation 1 only")
        z = layer.zero_point.long()
        if int(z.min()) < 0 or int(z.max()) > qmax:
            raise ValueError(f"{name}: zero points must be activation codes (0..{qmax}) so that "
                             "the padding value 0 has a code")
        v_clamped, excess = byte_weights(layer.weight_codes, codes)
        excess = _f64(excess)
        step = _f64(layer.scale)[layer.group.numpy()]
        self.output_affine[name] = (
            -step, -step * excess + _f64(layer.clamp_bias) + _f64(layer.bias))
        c_out, c_in, kh, kw = layer.weight_codes.shape
        self.sum_bits[name] = sum_bits(c_in * kh * kw, qmax)
        self.layers[name] = {
            "in_channels": c_in, "out_channels": c_out, "kernel": [kh, kw],
            "stride": list(layer.stride), "padding": list(layer.padding), "bits": codes.bits,
            "groups": layer.num_groups, "weight_ratio": codes.weight_ratio,
        }
        self.tensors.update({
            f"{name}.weight_codes": v_clamped.to(torch.uint8),
            f"{name}.group": layer.group.to(torch.int32),
            f"{name}.scale": layer.scale.float().clone(),
            f"{name}.zero_point": layer.zero_point.to(torch.int32),
        })

    def _requant(self, prefix: str, m: np.ndarray, o: np.ndarray, input_bits: int) -> str:
        mult, off, shift = fixed_point(m, o, input_bits)
        self.tensors[f"{prefix}.multiplier"] = torch.from_numpy(mult)
        self.tensors[f"{prefix}.offset"] = torch.from_numpy(off)
        self.tensors[f"{prefix}.shift"] = torch.from_numpy(shift)
        return prefix

    def float_module(self, kind: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, **fields) -> None:
        if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"{kind}: expected a bias-free, ungrouped, undilated Conv2d")
        self.tensors[f"{kind}.weight"] = conv.weight.detach().float().clone()
        for field, t in zip(("bn_weight", "bn_bias", "bn_mean", "bn_var"),
                            (bn.weight, bn.bias, bn.running_mean, bn.running_var), strict=True):
            self.tensors[f"{kind}.{field}"] = t.detach().float().clone()
        self.ops.append({"op": kind, "weight_shape": list(conv.weight.shape),
                         "stride": list(conv.stride), "padding": list(conv.padding),
                         "eps": bn.eps, **fields})

    def codes_for(self, x: str, x_is_float: bool, layer: str) -> str:
        out = self.value("codes")
        if x_is_float:
            self.ops.append({"op": "float_to_codes", "input": x, "output": out, "to": layer})
            return out
        divisors = []
        for step in self.tensors[f"{layer}.scale"].tolist():
            d = Fraction(step) * 2**self.frac_bits
            if d.denominator != 1 or d >= 2**MAX_DIVISOR_BITS:
                raise ValueError(f"{layer}: grid step {step:.3g} is not a whole number of "
                                 f"stream units 2^-{self.frac_bits} below 2^{MAX_DIVISOR_BITS}; "
                                 "export with other fractional bits (--frac-bits)")
            divisors.append(int(d))
        prefix = f"{layer}.from_stream"
        self.tensors[f"{prefix}.divisor"] = torch.tensor(divisors, dtype=torch.int64)
        self.ops.append({"op": "fixed_to_codes", "input": x, "output": out, "to": layer,
                         "params": prefix})
        return out

    def to_fixed(self, x: str) -> str:
        out = self.value("fixed")
        self.ops.append({"op": "float_to_fixed", "input": x, "output": out})
        return out

    def adder(self, codes: str, layer: str) -> str:
        out = self.value("sums")
        self.ops.append({"op": "adder", "input": codes, "output": out, "layer": layer})
        return out

    def _folded(self, producer: str, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
        """``(m, o)`` with ``bn(layer output) = m·s + o`` per channel."""
        alpha, beta = self.output_affine[producer]
        a, c = _bn_affine(bn)
        return a * alpha, a * beta + c

    def sums_to_codes(self, sums: str, producer: str, bn: nn.BatchNorm2d, consumer: str) -> str:
        m, o = self._folded(producer, bn)
        step = _f64(self.tensors[f"{consumer}.scale"])[:, None]
        bits = self.sum_bits[producer]
        params = self._requant(f"{producer}.to_codes", m[None] / step, o[None] / step, bits)
        out = self.value("codes")
        self.ops.append({"op": "sums_to_codes", "input": sums, "output": out, "from": producer,
                         "to": consumer, "params": params, "input_bits": bits, "relu": True})
        return out

    def sums_to_fixed(
        self, sums: str, producer: str, bn: nn.BatchNorm2d, residual: str | None, relu: bool
    ) -> str:
        m, o = self._folded(producer, bn)
        unit = 2.0 ** self.frac_bits
        bits = self.sum_bits[producer]
        params = self._requant(f"{producer}.to_fixed", m * unit, o * unit, bits)
        out = self.value("fixed")
        self.ops.append({"op": "sums_to_fixed", "input": sums, "output": out, "from": producer,
                         "params": params, "input_bits": bits, "residual": residual,
                         "relu": relu})
        return out


def sum_bits(terms: int, qmax: int) -> int:
    """Bits of the largest SAD sum of ``terms`` code differences (each at most ``qmax``)."""
    return (terms * qmax).bit_length()


def _check_block(name: str, block: nn.Module) -> None:
    if not isinstance(block, BasicBlock):
        raise ValueError(f"{name}: only BasicBlock residual stages can be exported")
    layers = [block.conv1, block.conv2] + ([block.downsample[0]] if block.downsample else [])
    if not all(isinstance(m, QuantAdder2d) for m in layers):
        raise ValueError(f"{name}: every adder layer must be quantized (QuantAdder2d) before "
                         "export; run `adderquant ptq` first")


def lower(
    model: nn.Module, architecture: str, dataset: str | None = None, frac_bits: int = FRAC_BITS
) -> Package:
    """The deployment package of a quantized CIFAR adder ResNet (eval-mode statistics)."""
    if not isinstance(model, CifarResNet):
        raise ValueError(f"export supports the CIFAR adder ResNets (resnet20/32/56), got "
                         f"{type(model).__name__}")
    if not isinstance(model.avgpool, nn.AvgPool2d):
        raise ValueError("export expects an AvgPool2d before the classifier")
    low = _Lowering(frac_bits)
    blocks = [(f"{stage}.{i}", b) for stage in ("layer1", "layer2", "layer3")
              for i, b in enumerate(getattr(model, stage))]
    for name, block in blocks:
        _check_block(name, block)
        low.add_layer(f"{name}.conv1", block.conv1)
        low.add_layer(f"{name}.conv2", block.conv2)
        if block.downsample is not None:
            low.add_layer(f"{name}.downsample.0", block.downsample[0])

    low.float_module("stem", model.conv1, model.bn1, input="image", output="stem")
    x, x_is_float = "stem", True
    for name, block in blocks:
        c1 = low.codes_for(x, x_is_float, f"{name}.conv1")
        if block.downsample is not None:
            cd = low.codes_for(x, x_is_float, f"{name}.downsample.0")
        else:
            residual = low.to_fixed(x) if x_is_float else x
        s1 = low.adder(c1, f"{name}.conv1")
        c2 = low.sums_to_codes(s1, f"{name}.conv1", block.bn1, f"{name}.conv2")
        s2 = low.adder(c2, f"{name}.conv2")
        if block.downsample is not None:
            sd = low.adder(cd, f"{name}.downsample.0")
            residual = low.sums_to_fixed(sd, f"{name}.downsample.0", block.downsample[1], None,
                                         relu=False)
        x = low.sums_to_fixed(s2, f"{name}.conv2", block.bn2, residual, relu=True)
        x_is_float = False
    low.float_module("head", model.fc, model.bn2, input=x, output="logits",
                     pool=int(model.avgpool.kernel_size))

    state = model.state_dict()
    fq_tensors = {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    graph = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "dataset": dataset,
        "num_classes": model.fc.out_channels,
        "input_shape": list(model_record(architecture).input_size),
        "fixed_frac_bits": frac_bits,
        "layers": low.layers,
        "ops": low.ops,
        "fakequant": {
            "extra_state": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)},
            "tensors": {k: [DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in fq_tensors.items()},
        },
    }
    tensors = {**low.tensors, **{f"fakequant.{k}": v for k, v in fq_tensors.items()}}
    return Package(graph, tensors)


def export_model(
    model: nn.Module, architecture: str, out_dir, dataset: str | None = None
) -> Package:
    """Lower ``model`` and write the package into ``out_dir``; returns the package."""
    package = lower(model.eval(), architecture, dataset)
    save_package(package, out_dir)
    return package


def fakequant_model(package: Package) -> nn.Module:
    """The fake-quant model the package was exported from (eval mode)."""
    graph = package.graph
    model = create_model(graph["architecture"], graph["num_classes"])
    state = {k.removeprefix("fakequant."): v for k, v in package.tensors.items()
             if k.startswith("fakequant.")}
    extra = graph["fakequant"]["extra_state"]
    for key, info in extra.items():
        name = key.removesuffix("._extra_state")
        layer = QuantAdder2d(
            state[f"{name}.weight_codes"], state[f"{name}.group"], state[f"{name}.scale"],
            state[f"{name}.zero_point"], state[f"{name}.clamp_bias"],
            CodeRange(int(info["bits"]), int(info["weight_ratio"])), info["stride"],
            info["padding"], info["dilation"], state[f"{name}.bias"])
        replace_module(model, name, layer)
    state = {**state, **extra}
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise PackageError("\n".join([
            f"the fake-quant tensors of the package do not fit {graph['architecture']}:",
            *problems, "  export the quantized model again"]))
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model.eval()
