"""``adderquant compare``: the JSON rows and files it writes, its refusals, the Pareto front,
and the per-layer choice of the repaired shared-scale baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adderquant.cli import main
from adderquant.data import TensorLoader
from adderquant.models import create_model, load_pretrained, model_record
from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import QSSFConfig
from adderquant.quant.methods import quantize_qssf
from adderquant.quant.ptq import collect_statistics
from adderquant.quant.qssf_repaired import (
    QSSFRepairedConfig,
    centred_error,
    quantize_qssf_repaired,
)
from adderquant.studies import experiment
from adderquant.studies.comparison import pareto_front

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NUMBERS = ("top1", "test_agreement", "agreement", "kl", "energy_uj", "seconds")


def test_pareto_front_keeps_rows_no_other_beats():
    rows = [{"energy_uj": e, "top1": t} for e, t in
            [(5.0, 90.0), (1.0, 80.0), (2.0, 79.0), (3.0, 85.0), (3.0, 86.0), (9.0, 89.0)]]
    assert pareto_front(rows) == [1, 4, 0]


def test_qssf_repaired_takes_the_better_source_per_layer():
    torch.manual_seed(0)
    layer = Adder2d(4, 6, 3, padding=1)
    with torch.no_grad():
        layer.adder.mul_(20)  # weights far wider than the inputs, as in trained AdderNets
    obs = ActivationObserver(keep_images=8)
    obs.update(torch.relu(torch.randn(8, 4, 6, 6)))
    quant, report = quantize_qssf_repaired("layer", layer, obs, 4, QSSFRepairedConfig(bits=4))
    errors = {src: centred_error(layer, quantize_qssf("layer", layer, obs, 4,
                                                      QSSFConfig(bits=4, qssf_source=src))[0],
                                 obs.kept_inputs)
              for src in ("weights", "activations")}
    assert report["qssf_source"] == min(errors, key=errors.get)
    assert centred_error(layer, quant, obs.kept_inputs) == pytest.approx(min(errors.values()))


def test_compare_refuses_a_repeated_width(capsys):
    assert main(["compare", "--bits", "4", "4", "--no-progress"]) == 2
    assert "--bits lists a width twice" in capsys.readouterr().err


def test_compare_refuses_an_unknown_cnn_method(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--cnn-methods", "magic"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_compare_writes_rows_of_both_families(tmp_path, shared_data_root, cifar10_test,
                                              monkeypatch):
    for name in ("resnet20", "resnet20-cnn"):
        if not (SHARED / "models" / model_record(name).file).is_file():
            pytest.skip(f"the {name} checkpoint is not in {SHARED / 'models'}")
    passes = []

    def counted(model, calib, cfg, *args, **kwargs):
        passes.append(cfg.calib_batches)
        return collect_statistics(model, calib, cfg, *args, **kwargs)

    monkeypatch.setattr(experiment, "collect_statistics", counted)
    out, path = tmp_path / "out", tmp_path / "rows.json"
    # one width, two adder rows and one CNN method, batches of 16 calibration images, 50 test
    # and 32 agreement images
    assert main(["compare", "--data", str(shared_data_root), "--limit", "50", "--bits", "4",
                 "--adder-methods", "qssf", "qssf-repaired", "--calib-batch-size", "16",
                 "--bias-correction-batches", "1",
                 "--cnn-methods", "minmax", "--cnn-calib-batches", "1",
                 "--agreement-images", "32", "--threads", "2", "--no-progress", "-q",
                 "--json", str(path), "--out", str(out)]) == 0
    rows = json.loads(path.read_text())
    assert rows == json.loads((out / "results.json").read_text())
    for name in ("table.md", "accuracy_vs_bits.png", "accuracy_vs_energy.png"):
        assert (out / name).stat().st_size > 0
    assert [(r["family"], r["method"], r["bits"]) for r in rows] == [
        ("adder", "fp", None), ("adder", "qssf", 4), ("adder", "qssf-repaired", 4),
        ("cnn", "fp", None),
        ("cnn", "minmax", 4)]
    assert passes == [2]  # both adder rows share one pass of the adderquant method's 2 batches
    for r in rows:
        assert all(isinstance(r[k], float) for k in NUMBERS), r
        assert isinstance(r["additions"], int) and isinstance(r["multiplications"], int)
        assert r["additions"] == sum(n for k, n in r["ops"].items() if "_add" in k)
        assert 0 <= r["top1"] <= 100 and 0 <= r["agreement"] <= 100 and r["kl"] >= 0
        assert r["energy_uj"] > 0
    fp = {r["family"]: r for r in rows if r["bits"] is None}
    assert all(r["agreement"] == 100.0 and r["kl"] == 0.0 for r in fp.values())
    cnn4 = [r for r in rows if r["family"] == "cnn" and r["bits"] == 4]
    assert all(r["ops"]["int_mul4"] > 0 and r["energy_uj"] < fp["cnn"]["energy_uj"]
               for r in cnn4)
    for adder4 in (r for r in rows if r["family"] == "adder" and r["bits"] == 4):
        assert not any(k.startswith("int_mul") and k != "int_mul32" for k in adder4["ops"])
    # the CNN's float row, evaluated here on its own normalisation, without the comparison
    record = model_record("resnet20-cnn")
    model = load_pretrained(create_model("resnet20-cnn"), SHARED / "models" / record.file)
    images, labels = cifar10_test
    loader = TensorLoader(images[:50], labels[:50], "cifar10", 50,
                          normalisation=(record.mean, record.std))
    with torch.no_grad():
        correct = sum(int((model.eval()(x).argmax(1) == y).sum()) for x, y in loader)
    assert fp["cnn"]["top1"] == pytest.approx(100 * correct / 50)
