"""Measures of the reproduce table: KL divergence from the float model and runs merged over
calibration seeds."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from adderquant.models import create_model
from adderquant.studies.experiment import logits, mean_kl
from adderquant.studies.reproduce import format_accuracy_table, over_seeds


def test_mean_kl_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    reference, other = torch.randn(64, 10, generator=gen), torch.randn(64, 10, generator=gen)
    expected = F.kl_div(F.log_softmax(other.double(), 1), F.log_softmax(reference.double(), 1),
                        log_target=True, reduction="batchmean")
    assert mean_kl(reference, other) == pytest.approx(float(expected), rel=1e-12)
    assert mean_kl(reference, reference) == 0.0
    assert mean_kl(reference, reference + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-free


def _run(top1: float, agreement: float, kl: float) -> list[dict]:
    return [{"method": "fp", "bits": None, "top1": 91.6, "agreement": 100.0, "kl": 0.0,
             "seconds": 1.0},
            {"method": "adderquant", "bits": 4, "top1": top1, "agreement": agreement, "kl": kl,
             "seconds": 2.0}]


def test_over_seeds_gives_mean_sd_and_values() -> None:
    runs = [_run(91.1, 99.4, 0.011), _run(91.0, 99.3, 0.013), _run(90.7, 99.5, 0.012)]
    fp, q = over_seeds(runs)
    assert fp["top1"] == pytest.approx(91.6) and fp["top1_sd"] == pytest.approx(0.0, abs=1e-9)
    assert fp["seconds"] == 3.0
    values = [91.1, 91.0, 90.7]
    assert q["top1"] == pytest.approx(statistics.mean(values))
    assert q["top1_sd"] == pytest.approx(statistics.stdev(values))
    assert q["kl_seeds"] == pytest.approx([0.011, 0.013, 0.012])
    table = format_accuracy_table([fp, q], "top1")
    assert f"| adderquant |  | {statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} |" \
        in table
    assert "| 12.0 ± 1.0 |" in format_accuracy_table([fp, q], "kl")  # 10^-3 nats, 3 digits
    assert over_seeds([runs[0]]) == runs[0]
    with pytest.raises(ValueError, match="same rows"):
        over_seeds([runs[0], runs[1][::-1]])


def test_logits_over_threads_keep_the_order_and_values_of_one_thread() -> None:
    model = create_model("lenet5").eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 1, 28, 28, generator=gen), None) for n in (5, 3, 7, 2, 4)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = logits(model, batches)
        torch.set_num_threads(2)
        out = logits(model, batches)
        assert torch.get_num_threads() == 2  # restored after the threaded pass
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (21, 10)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
