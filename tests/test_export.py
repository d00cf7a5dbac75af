"""Deployment package: exact round trip, atomic files, clear errors for bad packages."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from adderquant.cli import main
from adderquant.engine import (
    IntegerEngine,
    PackageError,
    export_model,
    fakequant_model,
    load,
    load_package,
    lower,
)
from adderquant.engine.package import (
    GRAPH_FILE,
    MANIFEST_FILE,
    PACKAGE_FILES,
    TENSOR_FILE,
    Package,
    validate,
)
from adderquant.models import create_model
from adderquant.quant.io import save_quantized
from test_engine import input_thresholds, quantize_resnet


@pytest.fixture(scope="module")
def quantized() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    for m in model.modules():  # BatchNorm statistics that keep the activations alive
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(-40.0, 5.0)
            m.running_var.uniform_(20.0, 60.0)
    return quantize_resnet(model, input_thresholds(model, torch.randn(4, 3, 32, 32)), 4)


@pytest.fixture()
def package_dir(quantized, tmp_path):
    export_model(quantized, "resnet20", tmp_path / "pkg", "cifar10")
    return tmp_path / "pkg"


def rewrite(directory, graph: dict | str | None = None, tensors: dict | None = None) -> None:
    """Rewrite a package (``graph``: a dict or the raw text of model.json) with a manifest
    that matches (a deliberate, well-formed change)."""
    data = save_safetensors(tensors) if tensors is not None else (
        directory / TENSOR_FILE).read_bytes()
    (directory / TENSOR_FILE).write_bytes(data)
    text = graph if isinstance(graph, str) else json.dumps(
        graph if graph is not None else json.loads((directory / GRAPH_FILE).read_text()))
    (directory / GRAPH_FILE).write_text(text)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["sha256"] = {GRAPH_FILE: hashlib.sha256(text.encode()).hexdigest(),
                          TENSOR_FILE: hashlib.sha256(data).hexdigest()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_round_trip_is_exact(quantized, package_dir):
    original = lower(quantized, "resnet20", "cifar10")
    loaded = load_package(package_dir)
    assert loaded.graph == json.loads(json.dumps(original.graph))
    assert loaded.tensors.keys() == original.tensors.keys()
    for name, t in original.tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t)
    x = torch.randn(6, 3, 32, 32)
    assert torch.equal(load(package_dir)(x), IntegerEngine(original)(x))
    with torch.no_grad():
        assert torch.equal(fakequant_model(loaded)(x), quantized(x))
    assert sorted(p.name for p in package_dir.iterdir()) == sorted(PACKAGE_FILES)


def test_truncated_and_tampered_tensor_file(package_dir):
    data = (package_dir / TENSOR_FILE).read_bytes()
    (package_dir / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="SHA-256"):
        load_package(package_dir)
    tampered = bytearray(data)
    tampered[-100] ^= 1
    (package_dir / TENSOR_FILE).write_bytes(bytes(tampered))
    with pytest.raises(PackageError, match="SHA-256"):
        load_package(package_dir)
    (package_dir / TENSOR_FILE).write_bytes(data[:1000])
    rewrite(package_dir)  # a matching checksum over a truncated file
    with pytest.raises(PackageError, match="cannot be read"):
        load_package(package_dir)


def test_bad_graph_files(package_dir):
    text = (package_dir / GRAPH_FILE).read_text()
    (package_dir / GRAPH_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(PackageError, match="SHA-256"):
        load_package(package_dir)
    rewrite(package_dir, text[: len(text) // 2])  # a matching manifest over a truncated file
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(package_dir)
    graph = json.loads(text)
    graph["version"] = 99
    rewrite(package_dir, graph)
    with pytest.raises(PackageError, match="version 99"):
        load_package(package_dir)
    graph["version"], graph["format"] = 2, "something-else"
    rewrite(package_dir, graph)
    with pytest.raises(PackageError, match="not an"):
        load_package(package_dir)
    (package_dir / MANIFEST_FILE).unlink()
    with pytest.raises(PackageError, match="older adderquant"):
        load_package(package_dir)
    (package_dir / GRAPH_FILE).unlink()
    with pytest.raises(PackageError, match="not a deployment package"):
        load_package(package_dir)


def test_codes_and_parameters_out_of_range(package_dir):
    base = load_package(package_dir)
    cases = [
        ("layer1.0.conv1.weight_codes", lambda t: t.fill_(16), "out of range for 4 bits"),
        ("layer2.0.conv1.zero_point", lambda t: t.fill_(-1), "zero_point"),
        ("layer3.1.conv2.group", lambda t: t.fill_(7), "group"),
        ("layer1.1.conv1.scale", lambda t: t.fill_(0.0), "positive"),
        ("layer1.0.conv1.to_codes.shift", lambda t: t.fill_(80), "shift"),
        ("layer1.0.conv1.to_codes.multiplier", lambda t: t.fill_(2**60), "multiplier"),
        ("layer1.1.conv1.from_stream.divisor", lambda t: t.fill_(0), "divisor"),
        ("stem.bn_var", lambda t: t.fill_(float("nan")), "NaN"),
    ]
    for name, corrupt, message in cases:
        tensors = {k: v.clone() for k, v in base.tensors.items()}
        corrupt(tensors[name])
        rewrite(package_dir, dict(base.graph), tensors)
        with pytest.raises(PackageError, match=message):
            load_package(package_dir)


def test_shape_dtype_and_missing_tensors(package_dir):
    base = load_package(package_dir)
    for change, message in [
        (lambda t: t.update({"head.weight": t["head.weight"][:5]}), "expected float32"),
        (lambda t: t.update({"layer1.0.conv1.group": t["layer1.0.conv1.group"].long()}),
         "expected int32"),
        (lambda t: t.pop("layer2.2.conv2.weight_codes"), "missing"),
        (lambda t: t.update({"extra": torch.zeros(1)}), "unexpected"),
    ]:
        tensors = dict(base.tensors)
        change(tensors)
        with pytest.raises(PackageError, match=message):
            validate(Package(base.graph, tensors))
    graph = json.loads(json.dumps(base.graph))
    graph["ops"][3]["input"] = "nowhere"
    with pytest.raises(PackageError, match="before it is computed"):
        validate(Package(graph, base.tensors))
    graph["ops"][3]["op"] = "conv3d"
    with pytest.raises(PackageError, match="unknown kind"):
        validate(Package(graph, base.tensors))


def test_export_rejects_float_layers():
    with pytest.raises(ValueError, match="QuantAdder2d"):
        lower(create_model("resnet20"), "resnet20")
    with pytest.raises(ValueError, match="CIFAR adder ResNets"):
        lower(create_model("lenet5"), "lenet5")


def test_export_and_infer_commands(quantized, tmp_path, capsys, cifar10_dir):
    save_quantized(tmp_path / "q.pt", quantized, "resnet20", 10, {"bits": 4})
    out = tmp_path / "pkg"
    assert main(["export", str(tmp_path / "q.pt"), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adder_layers"] == 20 and summary["bits"] == [4]
    assert main(["infer", str(out), "--engine", "int", "--limit", "20", "--batch-size", "8",
                 "--reference", "float32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 20 and result["reference"] == "fakequant-float32"
    assert 0.0 <= result["top1"] <= 100.0 and 0.0 <= result["agreement"] <= 100.0
    assert main(["infer", str(out), "--engine", "fakequant", "--limit", "8", "--reference",
                 "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agreement"] == 100.0  # the same model
    assert main(["infer", str(tmp_path / "missing")]) == 2
    assert "not a deployment package" in capsys.readouterr().err
