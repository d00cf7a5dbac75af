"""Calibration observers keep their samples in one buffer per layer that doubles when full:
few long-lived allocations (one small tensor kept per batch and layer, between the large
short-lived activations of a calibration pass, fragmented the C heap by about 20 MB per batch
on the released ResNet-20) and the same values as drawing them batch by batch."""

from __future__ import annotations

import torch

from adderquant.quant.calibrate import ActivationObserver


def test_samples_are_the_per_batch_draws_in_one_doubling_buffer() -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 4, 5, 6, generator=gen) for _ in range(37)]
    obs = ActivationObserver(sample_per_batch=50, seed=7)
    allocations, ptr = 0, None
    for x in batches:
        obs.update(x)
        if obs._sample.untyped_storage().data_ptr() != ptr:
            allocations, ptr = allocations + 1, obs._sample.untyped_storage().data_ptr()
    # the reference: the same generator's draws, batch by batch, concatenated
    ref_gen = torch.Generator().manual_seed(7)
    expected = torch.cat([x.flatten()[torch.randint(0, x.numel(), (50,), generator=ref_gen)]
                          for x in batches])
    assert torch.equal(obs.sample, expected)
    # 37 batches of 50 values: capacities 50, 100, 200, ..., 3200: 7 buffers, not 37 tensors
    assert allocations == 7
    assert len(obs._sample) < 2 * len(expected)
