"""Training an adder LeNet-5 on real Fashion-MNIST images."""

import math

import pytest
import torch

from adderquant.data import TensorLoader, load_dataset
from adderquant.evaluate import evaluate
from adderquant.models import create_model
from adderquant.train import TrainConfig, cosine_lr, train


def test_cosine_schedule_matches_released_formula():
    for epoch in (0, 17, 200, 399):
        expected = 0.05 * (1 + math.cos(math.pi * epoch / 400))
        assert cosine_lr(0.1, epoch, 400) == pytest.approx(expected)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_lenet_learns_fashion_mnist():
    try:
        images, labels = load_dataset("fashion-mnist", train=True)
        test_images, test_labels = load_dataset("fashion-mnist", train=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    torch.manual_seed(0)
    model = create_model("lenet5")
    held_out = TensorLoader(test_images[:2000], test_labels[:2000], "fashion-mnist", 500)
    before = evaluate(model, held_out, progress=False)
    log = train(model, images[:4000], labels[:4000], "fashion-mnist",
                TrainConfig(epochs=2, batch_size=64, lr=0.1), progress=False)
    after = evaluate(model, held_out, progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    assert after.top1 > 60.0 and after.top1 > before.top1 + 30.0
