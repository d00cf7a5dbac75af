"""The PTQ pipeline, its configuration, saving/loading and the repairs (BN, bias)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from adderquant.cli.config_args import add_config_args, config_from_args
from adderquant.models import create_model
from adderquant.nn import Adder2d
from adderquant.quant.bn import correct_adder_bias, reestimate_bn
from adderquant.quant.config import AdderQuantConfig, PaperConfig, QSSFConfig
from adderquant.quant.io import load_quantized, save_quantized
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.ptq import (
    CalibrationSet,
    collect_statistics,
    quantize,
    quantize_model,
    quantize_with_report,
)

FAST = {"calib_batches": 1, "calib_batch_size": 4, "report_images": 1,
        "bias_correction_batches": 1, "bn_batches": 1}


def same_state(a: dict, b: dict) -> bool:
    """Equal keys, and equal tensors (dtype and values) and other entries under them."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor)
        else a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20")
    with torch.no_grad():  # give the random model BN statistics that fit its adder outputs
        reestimate_bn(m, [(torch.randn(16, 3, 32, 32), None)], momentum=None)
    return m.eval()


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    return CalibrationSet(images, torch.zeros(64, dtype=torch.long), "cifar10", batch_size=8)


def test_ptq_quantizes_adder_layers_only_and_is_deterministic(model, calib) -> None:
    cfg = PaperConfig(bits=6, layer_bits={"layer3.2.conv2": 8}, bias_correction="float-input",
                    **FAST)
    q1, report = quantize_with_report(model, cfg, calib)
    q2, _ = quantize_with_report(model, cfg, calib)
    assert isinstance(q1.conv1, nn.Conv2d) and isinstance(q1.fc, nn.Conv2d)
    assert torch.equal(q1.conv1.weight, model.conv1.weight)
    quant = {n: m for n, m in q1.named_modules() if isinstance(m, QuantAdder2d)}
    assert len(quant) == 20 and not any(isinstance(m, Adder2d) for m in q1.modules())
    assert quant["layer3.2.conv2"].bits == 8 and quant["layer1.0.conv1"].bits == 6
    state1, state2 = q1.state_dict(), q2.state_dict()
    assert all(torch.equal(state1[k], state2[k]) for k in state1 if k.endswith(
        ("weight_codes", "scale", "bias", "running_mean")))
    assert {e["layer"] for e in report["layers"]} == set(quant)
    assert all("sqnr_db" in e and "bias_correction_mean_abs" in e for e in report["layers"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(q1(x), q2(x))
    assert any(isinstance(m, Adder2d) for m in model.modules())  # the input is untouched


def test_bias_correction_removes_the_mean_error_of_each_layer(model, calib) -> None:
    cfg = PaperConfig(bits=4, **FAST)
    observers = collect_statistics(model, calib, cfg)
    plain, _ = quantize_model(model, observers, cfg)
    corrected, _ = quantize_model(model, observers, cfg)
    correct_adder_bias(corrected, model, calib.batches(2), inputs="float")
    x = calib.batches(1).__iter__().__next__()[0]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in model.named_modules() if isinstance(m, Adder2d)]
    model(x)
    for h in hooks:
        h.remove()
    name = "layer2.1.conv1"
    ref = model.get_submodule(name)(inputs[name])
    err_plain = (ref - plain.get_submodule(name)(inputs[name])).mean(dim=(0, 2, 3)).abs()
    err_corr = (ref - corrected.get_submodule(name)(inputs[name])).mean(dim=(0, 2, 3)).abs()
    assert err_corr.mean() < 0.2 * err_plain.mean()


def test_bn_reestimation_recomputes_running_statistics() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(32, 3, 5, 5) * 2 + 1
    reestimate_bn(m, [(x[:16], None), (x[16:], None)], momentum=None)
    y = m[0](x)
    assert torch.allclose(m[1].running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not m.training and m[1].momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn(m, [])


def test_pipeline_errors(model, calib) -> None:
    with pytest.raises(ValueError, match="no adder layers"):
        quantize(nn.Sequential(nn.Conv2d(3, 4, 1)), PaperConfig(**FAST), calib)
    with pytest.raises(ValueError, match="unknown adder layers"):
        quantize(model, PaperConfig(layer_bits={"nope": 4}, **FAST), calib)
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize(model, PaperConfig(**FAST), [])
    with pytest.raises(ValueError, match=r"layer_bits\['x'\].*from 2 to 8"):
        PaperConfig(layer_bits={"x": 9})
    with pytest.raises(ValueError, match="from 2 to 8"):
        PaperConfig(bits=1)


def test_save_and_load_rebuild_the_quantized_model(model, calib, tmp_path) -> None:
    cfg = PaperConfig(bits=5, groups="per-channel", **FAST)
    q, report = quantize_with_report(model, cfg, calib)
    path = tmp_path / "q.pt"
    save_quantized(path, q, "resnet20", 10, cfg.as_dict(), report)
    loaded, payload = load_quantized(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), q(x))
    assert payload["config"]["groups"] == "per-channel" and payload["model"] == "resnet20"
    assert loaded.get_submodule("layer2.0.conv1").num_groups == 32
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot read quantized model"):
        load_quantized(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing.pt")


def test_config_from_file_preset_and_flags(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, PaperConfig.method)
    (tmp_path / "c.yaml").write_text("bits: 5\ngroups: 8\nact_clip: mse\n")
    (tmp_path / "c.json").write_text(json.dumps({"bits": 3, "weight_clamp": False}))
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--groups", "per-channel",
                              "--layer-bits", "layer1.0.conv1=8", "--no-grouping",
                              "--bn-momentum", "none"])
    cfg = config_from_args(args)
    assert isinstance(cfg, PaperConfig)
    assert (cfg.bits, cfg.groups, cfg.act_clip, cfg.grouping) == (5, "per-channel", "mse", False)
    assert cfg.layer_bits == {"layer1.0.conv1": 8} and cfg.bn_momentum is None
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.json"),
                                              "--preset", "faithful"]))
    assert (cfg.bits, cfg.weight_clamp, cfg.bn_reestimate) == (3, True, True)
    assert PaperConfig.from_dict(json.loads((tmp_path / "c.json").read_text())).bits == 3
    with pytest.raises(ValueError, match=r"method 'paper' has no setting \['bitz'\]"):
        PaperConfig.from_dict({"bitz": 4})
    with pytest.raises(SystemExit):
        parser.parse_args(["--act-clip", "median"])
    # the method's own defaults, and flags of another method refused with their names
    cfg = config_from_args(parser.parse_args(["--method", "adderquant"]))
    assert cfg == AdderQuantConfig() and cfg.calib_batches == 2
    with pytest.raises(ValueError, match="--act-clip do.*not apply to method 'adderquant'"):
        config_from_args(parser.parse_args(["--method", "adderquant", "--act-clip", "max"]))


def test_each_method_carries_its_own_defaults() -> None:
    assert (AdderQuantConfig().calib_batches, AdderQuantConfig().report_images,
            AdderQuantConfig().bias_correction) == (2, 128, "none")
    assert (PaperConfig().calib_batches, PaperConfig().report_images,
            PaperConfig().bias_correction) == (202, 32, "float-input")
    assert QSSFConfig().qssf_source == "weights" and not hasattr(QSSFConfig(), "groups")
    assert PaperConfig().as_dict()["method"] == "paper"
    with pytest.raises(ValueError, match="method 'qssf' has no setting \\['groups'\\]"):
        QSSFConfig().replace(groups=2)


def test_skipping_negligible_bn_batches_changes_statistics_by_at_most_their_weight() -> None:
    # the bound of negligible_batches: the skipped batches and the initial value weigh (1 − m)^n
    from adderquant.quant.bn import negligible_batches

    assert negligible_batches(202, 0.1, 1e-6) == 202 - 132  # 0.9^132 < 1e-6 <= 0.9^131
    assert negligible_batches(50, 0.1, 1e-4) == 0
    assert negligible_batches(202, None, 1e-4) == 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g) * (1 + i / 10), None) for i in range(40)]
    full, skipped, head = (create_model("resnet20") for _ in range(3))
    skipped.load_state_dict(full.state_dict())
    head.load_state_dict(full.state_dict())
    reestimate_bn(full, batches, momentum=0.5)
    assert reestimate_bn(skipped, batches, momentum=0.5, negligible_weight=1e-3) == 10
    reestimate_bn(head, batches[:30], momentum=0.5)  # r_j: the statistics the skip leaves out
    for name, a in full.state_dict().items():
        if "running" in name:
            r0 = torch.zeros_like(a) if "mean" in name else torch.ones_like(a)
            change = 0.5**10 * (head.state_dict()[name] - r0)  # (1 − m)^n·(r_j − r_0)
            assert torch.allclose(skipped.state_dict()[name], a - change, rtol=1e-5, atol=1e-6)
            assert torch.all(change.abs() <= 1e-3 * (head.state_dict()[name] - r0).abs())


def test_unknown_method_fails_before_calibration() -> None:
    def never_iterated():
        raise AssertionError("calibration ran")
        yield

    class Unregistered(PaperConfig):
        method = "papr"

    with pytest.raises(ValueError, match="unknown quantization method 'papr'"):
        quantize(create_model("lenet5"), Unregistered(), never_iterated())
    with pytest.raises(TypeError, match="expected a quantization configuration"):
        quantize(create_model("lenet5"), {"method": "paper"}, never_iterated())
    with pytest.raises(ValueError, match="unknown adder layers"):
        quantize(create_model("lenet5"), PaperConfig(layer_bits={"nope": 4}), never_iterated())
    with pytest.raises(ValueError, match="filter_fn accepts none"):
        quantize(create_model("lenet5"), PaperConfig(), never_iterated(),
                 filter_fn=lambda module, name: False)


def test_ptq_leaves_the_callers_generator_and_training_mode_alone() -> None:
    model = create_model("lenet5").train()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=gen), None) for _ in range(2)]
    cfg = PaperConfig(bits=4, groups=2, calib_batches=2, report_images=4,
                      bias_correction="none")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    qmodel = quantize(model, cfg, batches)
    assert torch.equal(torch.rand(3), expected_next)  # the global generator was not drawn from
    assert model.training and not qmodel.training
    assert same_state(model.state_dict(), state)
    torch.manual_seed(999)  # another global seed: the same quantized model
    assert same_state(quantize(model, cfg, batches).state_dict(), qmodel.state_dict())


def test_filter_fn_chooses_the_layers_to_quantize(model, calib) -> None:
    cfg = PaperConfig(bits=4, bias_correction="float-input", **FAST)
    every, _ = quantize_with_report(model, cfg, calib)
    chosen, report = quantize_with_report(model, cfg, calib,
                                          filter_fn=lambda m, name: name.startswith("layer1."))
    order = [n for n, m in model.named_modules() if isinstance(m, Adder2d)]
    quant = {n for n, m in chosen.named_modules() if isinstance(m, QuantAdder2d)}
    assert quant == {n for n in order if n.startswith("layer1.")} and len(quant) == 6
    assert {n for n, m in chosen.named_modules() if isinstance(m, Adder2d)} == set(order) - quant
    assert [e["layer"] for e in report["layers"]] == [n for n in order if n in quant]
    # bias correction on float inputs corrects each layer alone: the same layers either way
    for name in quant:
        assert same_state(every.get_submodule(name).state_dict(),
                          chosen.get_submodule(name).state_dict())
