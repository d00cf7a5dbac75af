"""Save and load quantized models.

The file is a ``torch.save`` mapping (loaded with ``weights_only=True``)::

    {"format": "adderquant-quantized", "version": 1, "model": "resnet20", "num_classes": 10,
     "config": {...PTQConfig fields...}, "report": {...}, "state_dict": {...}}

``state_dict`` is the quantized model's, in which every :class:`QuantAdder2d` stores its integer
weight codes, groups, scales, zero points, biases and an extra state (bit width, weight step
ratio, stride, padding, dilation). Loading rebuilds the model by name and puts a
:class:`QuantAdder2d` in place of every adder layer that the file quantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adderquant._io import write_torch_atomic
from adderquant.models import create_model
from adderquant.models.checkpoint import (
    CheckpointError,
    load_tensors_only,
    state_mismatch,
    tensors_with_bad_numbers,
)
from adderquant.quant.grid import CodeRange
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module

FORMAT = "adderquant-quantized"
VERSION = 1
_BUFFERS = ("weight_codes", "group", "scale", "zero_point", "clamp_bias", "bias")


def save_quantized(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    num_classes: int,
    config: dict[str, Any],
    report: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (quantized) with its architecture name and configuration, atomically."""
    payload = {
        "format": FORMAT, "version": VERSION, "model": model_name, "num_classes": num_classes,
        "config": config, "report": report or {},
        "state_dict": {k: v.cpu() if isinstance(v, torch.Tensor) else v
                       for k, v in model.state_dict().items()},
    }
    write_torch_atomic(path, payload)


def read_quantized(path: str | Path) -> dict[str, Any]:
    """The saved mapping, checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model at {path}; create one with adderquant ptq")
    try:
        payload = load_tensors_only(path, "quantized model")
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adderquant quantized model (format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has format version {payload.get('version')}; this adderquant "
                         f"reads version {VERSION}")
    if not isinstance(payload.get("state_dict"), dict):
        raise ValueError(f"{path} has no state dict; create it again with adderquant ptq")
    problems = tensors_with_bad_numbers(payload["state_dict"])
    if problems:
        raise ValueError(f"{path} holds values that make the outputs meaningless: "
                         f"{problems}; quantize a finite model again with adderquant ptq")
    return payload


def load_quantized(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the quantized model saved at ``path``; returns ``(model in eval mode, payload)``."""
    payload = read_quantized(path)
    state = payload["state_dict"]
    try:
        model = create_model(payload["model"], payload["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unknown architecture {payload.get('model')!r} with "
                         f"{payload.get('num_classes')!r} classes ({e})") from None
    for name, layer in adder_layers(model).items():
        prefix = f"{name}."
        if prefix + "weight_codes" not in state:
            continue
        codes = state[prefix + "weight_codes"]
        if not isinstance(codes, torch.Tensor) or codes.shape != layer.adder.shape:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)
            raise ValueError(f"{path}: layer {name} holds weight codes of shape {shape}, but "
                             f"{payload['model']} needs {tuple(layer.adder.shape)}; the file "
                             "is damaged or from another architecture: quantize again")
        missing = [b for b in _BUFFERS if prefix + b not in state]
        extra = state.get(prefix + "_extra_state")
        if missing or not isinstance(extra, dict):
            raise ValueError(f"{path}: the quantized layer {name!r} lacks "
                             f"{missing or ['_extra_state']}")
        quant = QuantAdder2d(
            state[prefix + "weight_codes"], state[prefix + "group"], state[prefix + "scale"],
            state[prefix + "zero_point"], state[prefix + "clamp_bias"],
            CodeRange(int(extra["bits"]), int(extra["weight_ratio"])),
            extra["stride"], extra["padding"], extra["dilation"], state[prefix + "bias"],
        )
        replace_module(model, name, quant)
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError("\n".join([f"{path} does not fit {payload['model']}:", *problems,
                                    "  the file is damaged or from another architecture"]))
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model.eval(), payload
