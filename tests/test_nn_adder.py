"""``Adder2d`` as an ``nn.Conv2d`` drop-in: parameters made on a chosen device and dtype."""

from __future__ import annotations

import torch
from torch import nn

from adderquant.nn import Adder2d


def test_device_and_dtype_arguments_place_the_parameters_like_conv2d() -> None:
    for kwargs in ({"dtype": torch.float64}, {"device": "meta"},
                   {"device": "meta", "dtype": torch.float16}):
        adder = Adder2d(3, 8, 3, bias=True, **kwargs)
        conv = nn.Conv2d(3, 8, 3, bias=True, **kwargs)
        for a, c in ((adder.adder, conv.weight), (adder.bias, conv.bias)):
            assert (a.device, a.dtype, a.shape) == (c.device, c.dtype, c.shape)
    torch.manual_seed(0)
    default = Adder2d(3, 8, 3)
    torch.manual_seed(0)
    explicit = Adder2d(3, 8, 3, device="cpu", dtype=torch.float32)
    assert torch.equal(default.adder, explicit.adder)  # the same N(0, 1) initialisation
