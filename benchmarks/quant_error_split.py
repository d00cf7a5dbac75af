"""Where a quantized adder ResNet-20's error comes from: held-out agreement and KL from the float
model with everything quantized, with only the weights quantized (float inputs to every adder
layer) and with only the inputs quantized (the float model's weights, unclamped).

The quantized model is one written by ``adderquant ptq ... --out FILE`` (or ``qat --out``).
Weights only: ``−Σ|x − ŵ| + clamp_bias + bias`` with ``ŵ`` the dequantized codes (the lossless
clamp's excess kept). Inputs only: ``−Σ|x̂_g − w| + bias`` with ``x̂_g`` the input on the grid of
each output channel's group and ``w`` the float weights. KL in nats ×10⁻³ on the first
``--held`` of the last 10,000 training images, which neither post-training calibration nor QAT
uses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import torch
from torch import nn

import held_out
from adderquant.ops import adder2d
from adderquant.quant.layers import QuantAdder2d, replace_module
from adderquant.quant.qat import batched_logits, mean_kl


class WeightsOnly(nn.Module):
    """The quantized layer's weights (and clamp) on float inputs."""

    def __init__(self, layer: QuantAdder2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.layer
        y = adder2d(x, q.dequantized_weight(), None, q.stride, q.padding, q.dilation, eta=None)
        return y + (q.clamp_bias + q.bias).view(1, -1, 1, 1)


class InputsOnly(nn.Module):
    """The float weights on the quantized layer's input grids (one per group)."""

    def __init__(self, layer: QuantAdder2d, weight: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.weight = layer, weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.adder_on_grids(x, self.weight) + self.layer.bias.view(1, -1, 1, 1)


def variant(quantized: nn.Module, make: Callable[[str, QuantAdder2d], nn.Module]) -> nn.Module:
    out = copy.deepcopy(quantized)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantAdder2d):
            replace_module(out, name, make(name, m))
    return out.eval()


def main() -> None:
    p = held_out.parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    setup = held_out.load(p, args)
    model, quantized, held, prepare = setup.model, setup.quantized, setup.held, setup.prepare
    floats = dict(model.named_modules())
    reference = batched_logits(model, held, prepare)

    rows = {}
    for name, m in (
        ("all_quantized", quantized.eval()),
        ("weights_only", variant(quantized, lambda n, q: WeightsOnly(q))),
        ("inputs_only", variant(quantized, lambda n, q: InputsOnly(q, floats[n].adder))),
    ):
        out = batched_logits(m, held, prepare)
        rows[name] = {
            "agreement": 100.0 * float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "kl_e3": 1000 * mean_kl(reference, out),
        }
    if args.json:
        print(json.dumps({"held_out_images": len(held), "rows": rows}))
        return
    print(f"held-out agreement and KL from the float model ({len(held)} images)")
    for name, r in rows.items():
        print(f"  {name:14s} {r['agreement']:6.2f} %  KL {r['kl_e3']:8.2f} x1e-3 nats")


if __name__ == "__main__":
    main()
