"""Which images a BatchNorm refresh must see: held-out KL from the float adder ResNet-20 after
refreshing the statistics in train mode on plain or on augmented training images.

Rows: the float model itself refreshed (how far a refresh alone moves it), and a quantized model
(``adderquant ptq ... --out FILE``, its trainable copy as QAT starts from it) before any
refresh, refreshed on plain images, on augmented ones (QAT's refresh), and by the differential
rule (the float model's stored statistics plus the difference between the quantized and the
float model's refreshed statistics on the same augmented batches). Batches are QAT's
(``refresh_batches``, ``--seed``); KL in nats ×10⁻³ on the first ``--held`` of the last 10,000
training images, which QAT never trains on.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

import held_out
from adderquant.quant.qat import (
    AugmentedViews,
    batch_norms,
    batched_logits,
    mean_kl,
    refresh_batches,
    refresh_bn,
    to_trainable,
)
from adderquant.quant.qat_config import QATConfig


def refreshed(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    copied = copy.deepcopy(model)
    refresh_bn(copied, batches)
    return copied.eval()


def differential(student: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """``student`` with the float model's statistics moved by (student − float) refreshed ones."""
    out = copy.deepcopy(student)
    pairs = zip(batch_norms(out), batch_norms(model), batch_norms(refreshed(model, batches)),
                batch_norms(refreshed(student, batches)), strict=True)
    for bn, stored, float_new, student_new in pairs:
        bn.running_mean.copy_(stored.running_mean + student_new.running_mean
                              - float_new.running_mean)
        bn.running_var.copy_(stored.running_var * student_new.running_var
                             / float_new.running_var)
    return out.eval()


def main() -> None:
    p = held_out.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=50, help="refresh batches of 128")
    p.add_argument("--seed", type=int, default=0, help="refresh batches and augmentation")
    args = p.parse_args()
    setup = held_out.load(p, args)
    model, prepare, train, held = setup.model, setup.prepare, setup.train, setup.held
    student = to_trainable(setup.quantized, model).eval()
    cfg = QATConfig(bn_refresh_batches=args.batches, seed=args.seed)
    plain = refresh_batches(AugmentedViews(train, args.seed, augment=False), cfg, prepare)
    augmented = refresh_batches(AugmentedViews(train, args.seed, augment=True), cfg, prepare)
    reference = batched_logits(model, held, prepare)

    def kl(m: nn.Module) -> float:
        return 1000 * mean_kl(reference, batched_logits(m, held, prepare))

    rows = {
        "float_refreshed_plain": kl(refreshed(model, plain)),
        "float_refreshed_augmented": kl(refreshed(model, augmented)),
        "quantized_start": kl(student),
        "quantized_refreshed_plain": kl(refreshed(student, plain)),
        "quantized_refreshed_augmented": kl(refreshed(student, augmented)),
        "quantized_differential_augmented": kl(differential(student, model, augmented)),
    }
    if args.json:
        print(json.dumps({"held_out_images": len(held), "kl_e3": rows}))
        return
    print(f"held-out KL from the float model (x1e-3 nats, {len(held)} images)")
    for name, value in rows.items():
        print(f"  {name:34s} {value:9.2f}")


if __name__ == "__main__":
    main()
