"""Quantization-aware training: fake-quant gradients, the trainable adder layer against the
integer path, a training step, resume, export through the integer engine, the command line."""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adderquant.cli import main
from adderquant.data import NORMALISATION, load_cifar, normalize
from adderquant.engine import export_model, load
from adderquant.models import create_model
from adderquant.nn import Adder2d
from adderquant.ops import adder2d
from adderquant.quant.fakequant import fake_quant, lsq_grad_scale
from adderquant.quant.grid import CodeRange
from adderquant.quant.io import save_quantized
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module
from adderquant.quant.qat import (
    AugmentedViews,
    distillation_loss,
    load_checkpoint,
    mean_kl,
    qat,
    refresh_batches,
    refresh_bn,
    refresh_bn_checked,
    set_bn_frozen,
    to_quantized,
    to_trainable,
)
from adderquant.quant.qat_config import QATConfig
from adderquant.quant.qat_layer import QATAdder2d
from test_engine import input_thresholds, quantize_resnet

# --------------------------------------------------------------------------- fake quantizer


def reference_codes(v: np.ndarray, step: float, z: int, q_min: int, q_max: int, ratio: int,
                    lo: float | None, hi: float | None, weights: bool):
    """The grid formulas written out elementwise in float64 numpy: ``(v̂, ∂v̂/∂v, ∂v̂/∂Δ)``."""
    out, d_v, d_step = (np.empty_like(v) for _ in range(3))
    for i, value in np.ndenumerate(v):
        inside = lo is None or lo <= value <= hi
        c = value if inside else min(max(value, lo), hi)
        t = np.round((c / step + z) / ratio) if weights else np.round(c / step) + z
        unsaturated = q_min <= t <= q_max
        u = ratio * min(max(t, q_min), q_max) - z
        out[i] = step * u
        passed = inside and unsaturated
        d_v[i] = 1.0 if passed else 0.0
        d_step[i] = u - value / step if passed else u
    return out, d_v, d_step


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    bits=st.integers(2, 5),
    ratio=st.sampled_from([1, 2]),
    weights=st.booleans(),
    clamp=st.booleans(),
    step=st.floats(0.05, 2.0),
    zero=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_fake_quant_gradients_match_their_formulas(shape, bits, ratio, weights, clamp, step,
                                                   zero, seed):
    codes = CodeRange(bits, ratio)
    z = 0 if ratio == 2 else min(zero, codes.act_max)
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(shape, generator=g, dtype=torch.float64) * step * codes.act_max)
    lo = hi = None
    if clamp and weights:
        lo = torch.tensor(-z * step if ratio == 1 else -codes.act_max * step, dtype=torch.float64)
        hi = torch.tensor((codes.act_max - z) * step if ratio == 1 else codes.act_max * step,
                          dtype=torch.float64)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    v.requires_grad_()
    s = torch.tensor(step, dtype=torch.float64, requires_grad=True)
    scale = 0.37
    out = fake_quant(v, s, torch.tensor(z), codes, lo, hi, grad_scale=scale, weights=weights)
    (out * upstream).sum().backward()
    q_min, q_max = (codes.weight_min, codes.weight_max) if weights else (0, codes.act_max)
    want, d_v, d_step = reference_codes(
        v.detach().numpy(), step, z, q_min, q_max, ratio if weights else 1,
        None if lo is None else float(lo), None if hi is None else float(hi), weights)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v.grad.numpy(), upstream.numpy() * d_v, rtol=0, atol=0)
    np.testing.assert_allclose(float(s.grad), scale * float((upstream.numpy() * d_step).sum()),
                               rtol=1e-9, atol=1e-9)


def test_lsq_scale_is_one_over_root_count_times_levels():
    assert lsq_grad_scale(100, CodeRange(2, 1)) == pytest.approx(1 / math.sqrt(300))


# --------------------------------------------------------------------------- the adder layer


def random_quant_layer(ratio: int, bits: int, seed: int = 0, groups: int = 3,
                       stride: int = 1) -> tuple[Adder2d, QuantAdder2d]:
    torch.manual_seed(seed)
    layer = Adder2d(6, 10, 3, stride=stride, padding=1)
    layer.adder.data *= 0.6
    group = torch.randint(0, groups, (10,))
    group[:groups] = torch.arange(groups)
    codes = CodeRange(bits, ratio)
    scale = torch.linspace(0.2, 0.6, groups)
    if ratio == 1:
        zp = torch.arange(groups, dtype=torch.int32) % 2
        lo, hi = -zp.float() * scale, (codes.act_max - zp.float()) * scale
    else:
        zp = torch.zeros(groups, dtype=torch.int32)
        lo, hi = -scale * codes.act_max, scale * codes.act_max
    quant = QuantAdder2d.from_float(layer, group, scale, zp, codes, lo, hi)
    quant.bias += torch.randn(10) * 0.1
    return layer, quant


@pytest.mark.parametrize("ratio,bits,stride", [(1, 2, 1), (1, 4, 2), (2, 3, 1), (2, 2, 2)])
def test_fake_quant_forward_equals_the_integer_path(ratio, bits, stride):
    layer, quant = random_quant_layer(ratio, bits, stride=stride)
    trainable = QATAdder2d.from_quant(quant, layer.adder)
    x = torch.relu(torch.randn(5, 6, 9, 9))
    with torch.no_grad():
        assert torch.equal(trainable.to_quant().weight_codes, quant.weight_codes)
        assert torch.equal(trainable(x), quant(x))  # quant(x): the SAD kernel's integer path
        # after training-like changes the converted layer still computes the same outputs
        trainable.weight.add_(torch.randn_like(trainable.weight) * 0.3)
        trainable.step.mul_(torch.tensor([1.07, 0.93, 1.02]))
        trainable.bias.add_(0.5)
        converted = trainable.to_quant()
        assert converted.integer_path_applies(x)
        assert torch.equal(trainable(x), converted(x))


def reference_layer(layer: QATAdder2d, x: torch.Tensor, true_gradient: bool) -> torch.Tensor:
    """The layer built from :func:`fake_quant` and the adder op on dequantized values,
    differentiated by autograd, with the same LSQ scales."""
    codes = layer.codes
    outs = torch.zeros(x.shape[0], layer.weight.shape[0], 5, 5, dtype=x.dtype)
    for j in range(len(layer.step)):
        idx = torch.nonzero(layer.group == j).flatten()
        s, z = layer.step[j], layer.zero_point[j]
        x_hat = fake_quant(x, s, z, codes, grad_scale=lsq_grad_scale(x[0].numel(), codes))
        lo, hi = s * layer.clamp_lo[j], s * layer.clamp_hi[j]
        w = layer.weight[idx]
        w_hat = fake_quant(w, s, z, codes, lo, hi, lsq_grad_scale(w.numel(), codes), True)
        y = adder2d(x_hat, w_hat, None, layer.stride, layer.padding, eta=None,
                    true_gradient=true_gradient)
        outs = outs.index_add(1, idx, y)
        scale = lsq_grad_scale(w.numel(), codes)
        s_w = s * scale + (s - s * scale).detach()
        dist = (s_w * layer.clamp_lo[j] - w).clamp_min(0) + (w - s_w * layer.clamp_hi[j]
                                                             ).clamp_min(0)
        outs = outs.index_add(1, idx, -dist.flatten(1).sum(1).view(1, -1, 1, 1).expand(
            x.shape[0], -1, 5, 5))
    return outs + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("ratio,true_gradient", [(1, False), (2, False), (1, True)])
def test_layer_gradients_equal_autograd_through_the_fake_quantizers(ratio, true_gradient):
    layer, quant = random_quant_layer(ratio, 2, seed=3)
    trainable = QATAdder2d.from_quant(quant, layer.adder).double()
    trainable.true_gradient = true_gradient
    with torch.no_grad():  # some weights beyond the clamp: they learn through the excess
        trainable.weight[:, 0] += 3.0
    x = (torch.relu(torch.randn(4, 6, 5, 5, dtype=torch.float64)) * 0.8).requires_grad_()
    upstream = torch.randn(4, 10, 5, 5, dtype=torch.float64)
    params = [x, trainable.weight, trainable.step, trainable.bias]
    got = torch.autograd.grad((trainable(x) * upstream).sum(), params)
    want = torch.autograd.grad((reference_layer(trainable, x, true_gradient) * upstream).sum(),
                               params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    outside = trainable.weight.detach() > trainable._bounds(trainable.step.detach())[1]
    assert outside.any() and (got[1][outside] != 0).all()


# --------------------------------------------------------------------------- training


class TinyAdderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.adder = Adder2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.adder(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_setup(seed: int = 0):
    """A tiny float adder net with BatchNorm statistics from its data, a 2-bit quantized copy,
    and 96 uint8 images (32 x 32) with labels."""
    torch.manual_seed(seed)
    model = TinyAdderNet()
    model.adder.adder.data *= 0.3
    model.fc.weight.data *= 20.0  # confident outputs, which 2 bits visibly change
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 4, (96,))
    x = (images.float() / 255 - 0.5) / 0.25
    for bn in (model.bn1, model.bn2):
        bn.momentum = None  # the cumulative average: statistics of all the images
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(x)))
    codes = CodeRange(2, 1)
    top = float(h.max())
    group = torch.arange(8) % 2
    scale = torch.tensor([top / 3, top / 6])
    zp = torch.zeros(2, dtype=torch.int32)
    quantized = TinyAdderNet()
    quantized.load_state_dict(model.state_dict())
    replace_module(quantized, "adder", QuantAdder2d.from_float(
        model.adder, group, scale, zp, codes, torch.zeros(2), scale * 3))
    return model, quantized.eval(), images, labels


TINY = {"normalisation": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}


def test_a_training_step_lowers_the_distillation_loss():
    model, quantized, images, _ = tiny_setup()
    student = to_trainable(quantized, model)
    set_bn_frozen(student, True)
    x = (images[:32].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        target = model(x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    before = distillation_loss(student(x), target, 1.0)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = distillation_loss(student(x), target, 1.0)
    assert float(after) < float(before.detach())


def test_trainable_copy_starts_as_the_quantized_model():
    model, quantized, images, _ = tiny_setup()
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        assert torch.equal(to_trainable(quantized, model).eval()(x), quantized(x))


def small_config(**changes) -> QATConfig:
    return QATConfig(**{"epochs": 3, "batch_size": 16, "lr": 0.05, "float_lr": 1e-3,
                        "holdout": 32, "eval_images": 32, "bn_refresh_batches": 2,
                        "views": 2, **changes})


def test_qat_returns_a_quantized_model_and_lowers_held_out_kl():
    model, quantized, images, labels = tiny_setup()
    result, report = qat(model, quantized, small_config(epochs=6), images, labels, "cifar10",
                         **TINY)
    layers = [m for m in result.modules() if isinstance(m, QuantAdder2d)]
    assert len(layers) == 1 and not result.training
    assert report["steps"] == 6 * (64 // 16) and len(report["epochs"]) == 6
    assert report["kl"] < report["start"]["kl"]
    moved = (layers[0].weight_codes != quantized.adder.weight_codes).double().mean()
    assert 0 < report["changed_codes"] == pytest.approx(float(moved), abs=1e-12)


def test_batch_norm_frozen_throughout_keeps_the_statistics_it_starts_with():
    """``bn_freeze=1`` without a refresh: every step sees the post-training model's BatchNorm
    statistics, which the trained model still holds; the default schedule changes them."""
    model, quantized, images, labels = tiny_setup()
    names = ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")
    start = {k: v.clone() for k, v in quantized.state_dict().items() if k in names}
    frozen, _ = qat(model, quantized, small_config(bn_freeze=1.0, bn_refresh_batches=0),
                    images, labels, "cifar10", **TINY)
    default, _ = qat(model, quantized, small_config(), images, labels, "cifar10", **TINY)
    for k in names:
        assert torch.equal(frozen.state_dict()[k], start[k]), k
        assert not torch.equal(default.state_dict()[k], start[k]), k


def test_a_refresh_that_raises_the_kl_is_undone():
    """The checked refresh keeps new statistics only where they bring the outputs closer to
    the targets: with the student's own outputs as targets (KL 0 before), any change is undone
    and the statistics stay bit for bit; against the float model's outputs the refresh of the
    tiny 2-bit model lowers the KL and is kept."""
    model, quantized, images, _ = tiny_setup()
    student = to_trainable(quantized, model)
    batches = [(images[i:i + 32].float() / 255 - 0.5) / 0.25 for i in (0, 32)]
    bn = student.bn2
    before = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        own = torch.cat([student.eval()(x) for x in batches])
        teacher = torch.cat([model(x) for x in batches])
    outcome = refresh_bn_checked(student, batches, own)
    assert outcome["kl_before"] == 0.0 and outcome["kl_after"] > 0.0 and not outcome["kept"]
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    outcome = refresh_bn_checked(student, batches, teacher)
    assert outcome["kept"] and outcome["kl_after"] < outcome["kl_before"]
    assert not torch.equal(bn.running_mean, before[0])


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    model, quantized, images, labels = tiny_setup()
    cfg = small_config()
    whole, _ = qat(model, quantized, cfg, images, labels, "cifar10", **TINY)
    qat_module = importlib.import_module("adderquant.quant.qat")  # the package exports qat()
    real_save = qat_module.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["state"]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(qat_module, "save_checkpoint", save_then_stop)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        qat(model, quantized, cfg, images, labels, "cifar10", checkpoint=state, **TINY)
    assert load_checkpoint(state)["state"]["epoch"] == 1
    resumed, _ = qat(model, quantized, cfg, images, labels, "cifar10", checkpoint=state,
                     resume=True, **TINY)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    model, quantized, images, labels = tiny_setup()
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable QAT checkpoint"):
        qat(model, quantized, small_config(), images, labels, "cifar10", checkpoint=bad,
            resume=True, **TINY)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not an adderquant QAT checkpoint"):
        load_checkpoint(bad)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="loss"):
        QATConfig(loss="mse")
    with pytest.raises(ValueError, match="eval_images"):
        QATConfig(holdout=10, eval_images=20)
    with pytest.raises(ValueError, match="quantized adder layers"):
        to_trainable(TinyAdderNet())


# --------------------------------------------------------------------------- export, CLI


def test_export_of_a_trained_model_round_trips_through_the_integer_engine(
        released_resnet20, cifar10_test, tmp_path):
    torch.manual_seed(0)
    x = (cifar10_test[0][:64].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(
        1, 3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    quantized = quantize_resnet(released_resnet20, input_thresholds(released_resnet20, x), 2)
    student = to_trainable(quantized, released_resnet20).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    with torch.no_grad():
        target = released_resnet20(x)
    for _ in range(2):
        loss = distillation_loss(student(x[:16]), target[:16], 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = to_quantized(student)
    assert all(not isinstance(m, QATAdder2d) for m in trained.modules())
    export_model(trained, "resnet20", tmp_path / "pkg", "cifar10")
    with torch.no_grad():  # the exact fake-quant model: float32 rounding moves 2-bit codes
        want = copy.deepcopy(trained).double()(x.double())
    assert torch.equal(load(tmp_path / "pkg")(x).argmax(1), want.argmax(1))


def test_cli_refuses_a_saved_model_of_another_architecture(tmp_path, capsys):
    quantized = quantize_resnet(create_model("resnet20"), {
        n: 1.0 for n in adder_layers(create_model("resnet20"))}, 2)
    path = tmp_path / "q.pt"
    save_quantized(path, quantized, "resnet20", 10, {})
    code = main(["qat", "--model", "resnet32", "--quantized", str(path), "--checkpoint",
                 str(tmp_path / "missing.pth"), "--steps", "1"])
    assert code == 2
    assert "holds a resnet20" in capsys.readouterr().err


def test_cli_refuses_a_bit_width_out_of_range(capsys):
    with pytest.raises(SystemExit) as e:
        main(["qat", "--bits", "1"])
    assert e.value.code == 2
    assert "--bits" in capsys.readouterr().err


def test_cli_resume_needs_a_state_file(capsys, released_checkpoint: Path):
    code = main(["qat", "--resume", "--checkpoint", str(released_checkpoint), "--steps", "1"])
    assert code == 2
    assert "--state" in capsys.readouterr().err


def test_learning_rate_warms_up_linearly_then_follows_the_cosine():
    from adderquant.quant.qat import schedule

    total, warmup = 20, 4
    factors = [schedule(s, total, warmup) for s in range(total)]
    assert factors[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    rest = [0.5 * (1 + math.cos(math.pi * k / (total - warmup))) for k in range(total - warmup)]
    assert factors[warmup:] == pytest.approx(rest)
    assert [schedule(s, total) for s in range(total)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)])
    with pytest.raises(ValueError, match="warmup must be in"):
        QATConfig(warmup=1.0)


def test_views_are_the_images_themselves_without_augmentation():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    idx = torch.tensor([4, 0, 2])
    plain = AugmentedViews(images, seed=0, augment=False)
    assert all(torch.equal(plain.batch(v, idx), images[idx]) for v in range(3))
    shifted = AugmentedViews(images, seed=0).batch(1, idx)
    assert shifted.shape == images[idx].shape and not torch.equal(shifted, images[idx])


def test_refresh_batches_hold_the_statistics_the_float_model_was_given(
        released_resnet20: nn.Module, cifar10_dir: Path):
    """The released ResNet-20's BatchNorm statistics come from augmented training images: a
    refresh of the float model itself on the refresh batches (augmented) leaves its held-out
    outputs nearly unchanged, one on the same images un-augmented moves them far more (the
    refresh of a quantized student must not add that shift)."""
    images, _ = load_cifar(cifar10_dir.parent, "cifar10", train=True)
    mean, std = NORMALISATION["cifar10"]
    prepare = lambda x: normalize(x, mean, std)  # noqa: E731
    cfg = QATConfig(bn_refresh_batches=12)
    train, held = images[:-10000], prepare(images[-10000:][:500])
    with torch.no_grad():
        reference = released_resnet20(held)
    shifts = {}
    for augment in (True, False):
        batches = refresh_batches(AugmentedViews(train, cfg.seed, augment), cfg, prepare)
        assert len(batches) == 12 and batches[0].shape == (128, 3, 32, 32)
        model = copy.deepcopy(released_resnet20)
        refresh_bn(model, batches)
        with torch.no_grad():
            shifts[augment] = mean_kl(reference, model.eval()(held))
    assert shifts[True] < 0.005
    assert shifts[False] > 10 * shifts[True]


def _cli_json(args: list[str], capsys) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_bit_lenet_on_fashion_mnist_recovers_most_of_the_post_training_loss(
        fashion_mnist_dir: Path, tmp_path: Path, capsys):
    """The second network of the QAT targets: an adder LeNet-5 trained from scratch by
    ``adderquant train``, quantized to 2 bits after training (87.1 %, 3.3 points below float),
    then trained by QAT (4 epochs, the rates of docs/method.md's LeNet-5 runs); all three
    scored on the 10,000 Fashion-MNIST test images. Measured: float 90.41 %, QAT 89.17 %,
    held-out KL 90 -> 43 x 10^-3 nats. The bound asserted is 1.5 points below float (the
    target of 1 point is not reached yet)."""
    data = ["--dataset", "fashion-mnist", "--data", str(fashion_mnist_dir)]
    assert main(["train", "--model", "lenet5", *data, "--epochs", "4", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    weights = ["--model", "lenet5", "--checkpoint", str(tmp_path / "run" / "model.pth"), *data]
    fp = _cli_json(["eval", *weights, "--json"], capsys)["top1"]
    ptq = _cli_json(["ptq", *weights, "--method", "adderquant", "--bits", "2", "--out",
                     str(tmp_path / "w2.pt"), "--json", "--no-progress"], capsys)["top1"]
    trained = _cli_json(["qat", *weights, "--quantized", str(tmp_path / "w2.pt"), "--epochs",
                         "4", "--lr", "1e-2", "--step-lr", "1e-3", "--float-lr", "1e-3",
                         "--true-gradient", "--json", "--no-progress"], capsys)
    assert trained["start_top1"] == pytest.approx(ptq)
    assert trained["top1"] >= fp - 1.5, (fp, ptq, trained["top1"])
    assert trained["kl"] < 0.6 * trained["start_kl"], (trained["start_kl"], trained["kl"])
