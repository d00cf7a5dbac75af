"""Operation counts against hand-computed values on a tiny model; the energy table's scaling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adderquant.cli import main
from adderquant.engine.energy import (
    EnergyTable,
    accumulator_bits,
    cnn_twin,
    count_ops,
    quantized_twin,
    summarize,
)
from adderquant.nn import Adder2d


class Tiny(nn.Module):
    """1x4x4 input: conv 3x3 (1->2) + BN, adder 3x3 (2->2) + BN + residual, avgpool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(2)
        self.adder = Adder2d(2, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.conv(x)))
        h = torch.relu(self.bn1(self.adder(h)) + h)
        return self.fc(self.pool(h).flatten(1))


SHAPE = (1, 1, 4, 4)
# conv: 32 outputs x 9 terms = 288; adder: 32 outputs x 18 terms = 576; bn1: 32 elements;
# residual: 32; pool: 32 inputs, 2 outputs; fc: 6 terms + 3 bias additions.


def totals(model: nn.Module) -> dict[str, int]:
    return summarize(count_ops(model, SHAPE), EnergyTable())["ops"]


def test_float_adder_counts():
    assert totals(Tiny()) == {
        "float_mul32": 288 + 32 + 2 + 6,
        "float_add32": 288 + 2 * 576 + 32 + 32 + 32 + 6 + 3,
        "int_abs32": 576,
    }


def test_cnn_twin_folds_batchnorm():
    assert totals(cnn_twin(Tiny())) == {
        "float_mul32": 288 + 576 + 2 + 6,
        "float_add32": 288 + 576 + 32 + 32 + 6 + 3,
    }


def test_quantized_counts():
    # 4 bits, 2 groups: subtract on 4 bits, accumulate on ceil(log2(18*15 + 1)) = 9 bits,
    # the input quantized onto 2 grids (2 x 32 elements), BN and residual in 32-bit integers.
    assert accumulator_bits(18, 4) == 9
    assert totals(quantized_twin(Tiny(), 4, groups=2)) == {
        "float_mul32": 288 + 2 + 6,
        "float_add32": 288 + 32 + 6 + 3,
        "int_add4": 576,
        "int_abs4": 576,
        "int_add9": 576,
        "int_mul32": 2 * 32 + 32,
        "int_add32": 2 * 32 + 32 + 32,
    }


def test_energy_per_image_of_tiny_quantized_model():
    got = summarize(count_ops(quantized_twin(Tiny(), 4, groups=2), SHAPE), EnergyTable())
    add9 = 0.03 + 0.07 * (9 - 8) / 24
    want = ((288 + 2 + 6) * 3.7 + (288 + 32 + 6 + 3) * 0.9 + 576 * (0.015 + add9)
            + 96 * 3.1 + 128 * 0.1)
    assert got["energy_uj"] == pytest.approx(want / 1e6, rel=1e-12)


def test_table_scaling():
    t = EnergyTable()
    assert t.energy("int_add", 8) == pytest.approx(0.03)
    assert t.energy("int_add", 4) == pytest.approx(0.015)
    assert t.energy("int_add", 20) == pytest.approx(0.065)
    assert t.energy("int_add", 64) == pytest.approx(0.2)
    assert t.energy("int_mul", 4) == pytest.approx(0.05)
    assert t.energy("int_mul", 16) == pytest.approx(0.2 + 2.9 * (256 - 64) / (1024 - 64))
    assert t.energy("int_mul", 64) == pytest.approx(3.1 * 4)
    assert t.energy("float_mul", 16) == 1.1
    assert t.energy("int_abs", 8) == 0.0
    with pytest.raises(ValueError, match="8-bit floats"):
        t.energy("float_add", 8)


def test_table_from_json(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"int_abs": {"8": 0.01}}))
    t = EnergyTable.from_json(path)
    assert t.energy("int_abs", 4) == pytest.approx(0.005)
    assert t.energy("int_add", 8) == pytest.approx(0.03)
    path.write_text(json.dumps({"int_sub": {"8": 0.01}}))
    with pytest.raises(ValueError, match="unknown kind"):
        EnergyTable.from_json(path)


def test_energy_command(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([
        {"method": "fp", "bits": 32, "top1": 91.6},
        {"method": "ours", "bits": 8, "top1": 91.3},
        {"method": "ours", "bits": 4, "top1": 89.5},
    ]))
    plot = tmp_path / "plot.png"
    assert main(["energy", "--bits", "8,4", "--json", "--results", str(results),
                 "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    energy = {k: v["energy_uj"] for k, v in report["models"].items()}
    assert list(energy) == ["cnn-fp32", "adder-fp32", "adder-int8", "adder-int4"]
    assert energy["cnn-fp32"] > energy["adder-fp32"] > energy["adder-int8"] > energy["adder-int4"]
    # ResNet-20 terms: 40.37 M in the adder layers, 0.44 M + 640 in the convolutions.
    ops = report["models"]["adder-fp32"]["ops"]
    assert ops["int_abs32"] == 40_370_176
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:  # refused by argparse, before any work
        main(["energy", "--bits", "9"])
    assert exc.value.code == 2
