"""Model zoo, its pretrained records, the released checkpoints and checkpoint errors."""

from __future__ import annotations

import copy
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adderquant.data import NORMALISATION, normalize
from adderquant.download import file_digest
from adderquant.models import (
    MODEL_NAMES,
    RECORDS,
    CheckpointError,
    create_model,
    load_pretrained,
    model_record,
    read_state_dict,
)
from adderquant.models.resnet_cifar import CifarResNet
from adderquant.nn import Adder2d

INPUTS = {  # (input shape, default number of classes)
    "resnet20": ((1, 3, 32, 32), 10),
    "resnet32": ((1, 3, 32, 32), 10),
    "resnet56": ((1, 3, 32, 32), 10),
    "resnet20-cnn": ((1, 3, 32, 32), 10),
    "resnet18": ((1, 3, 64, 64), 1000),
    "resnet50": ((1, 3, 64, 64), 1000),
    "lenet5": ((2, 1, 28, 28), 10),
}


def test_every_model_is_covered() -> None:
    assert set(INPUTS) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_create_model_runs_a_forward(name: str) -> None:
    shape, classes = INPUTS[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_num_classes(name: str) -> None:
    shape, _ = INPUTS[name]
    with torch.no_grad():
        assert create_model(name, 7).eval()(torch.randn(shape)).shape == (shape[0], 7)


def test_model_names_and_arguments_are_checked() -> None:
    assert isinstance(create_model("ResNet-20"), CifarResNet)
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of resnet20"):
        create_model("vgg")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        create_model("resnet20", 0)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


# --------------------------------------------------------------------------- released model


def adder_reference(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``Y[n,t,i,j] = -sum_{c,u,v} |X[n,c,i*s+u,j*s+v] - W[t,c,u,v]|`` (AdderNet, eq. 2)."""
    n, _, h, _ = x.shape
    out_c, _, k, _ = w.shape
    cols = F.unfold(x, k, padding=padding, stride=stride)  # n, c*k*k, L
    out = -(cols[:, None] - w.reshape(1, out_c, -1, 1)).abs().sum(dim=2)
    size = (h + 2 * padding - k) // stride + 1
    return out.reshape(n, out_c, size, size)


def resnet20_reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet-20 written out from the released checkpoint's documented layout, in float64."""
    s = {k: v.double() for k, v in state.items()}

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"],
                            s[f"{p}.bias"], training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, s["conv1.weight"], padding=1), "bn1"))
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        for block in range(3):
            p, st = f"layer{stage}.{block}", stride if block == 0 else 1
            out = F.relu(bn(adder_reference(h, s[f"{p}.conv1.adder"], st, 1), f"{p}.bn1"))
            out = bn(adder_reference(out, s[f"{p}.conv2.adder"], 1, 1), f"{p}.bn2")
            if f"{p}.downsample.0.adder" in s:
                h = bn(adder_reference(h, s[f"{p}.downsample.0.adder"], st, 0), f"{p}.downsample.1")
            h = F.relu(out + h)
    h = F.avg_pool2d(h, 8)
    return bn(F.conv2d(h, s["fc.weight"]), "bn2").flatten(1)


def test_released_checkpoint_loads(released_checkpoint: Path) -> None:
    raw = torch.load(released_checkpoint, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    state = read_state_dict(released_checkpoint)
    assert set(state) == {k.removeprefix("module.") for k in raw}
    model = load_pretrained(create_model("resnet20"), released_checkpoint)
    own = model.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)


def test_released_model_matches_the_written_out_network(
    released_checkpoint: Path, released_resnet20: torch.nn.Module, cifar10_test
) -> None:
    x = normalize(cifar10_test[0][:3], *NORMALISATION["cifar10"])
    expected = resnet20_reference(read_state_dict(released_checkpoint), x.double())
    with torch.no_grad():
        exact = copy.deepcopy(released_resnet20).double()(x.double())
        logits = released_resnet20(x)
    assert torch.allclose(exact, expected, rtol=0, atol=1e-9)
    # float32 through 19 adder layers (sums of up to 576 |x - w| terms, then BatchNorm).
    assert torch.allclose(logits.double(), expected, rtol=0, atol=1e-2)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_wrong_architecture_lists_the_keys(released_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("resnet32"), released_checkpoint)
    message = str(err.value)
    assert "missing keys (60)" in message and "layer1.3.conv1.adder" in message
    assert "unexpected keys" not in message and "is --model the architecture" in message
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("lenet5"), released_checkpoint)
    message = str(err.value)
    assert "missing keys" in message and "conv3.adder" in message
    assert "unexpected keys" in message and "layer1.0.conv1.adder" in message
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 64, 1, 1\) vs model "
                                              r"\(100, 64, 1, 1\)"):
        load_pretrained(create_model("resnet20", 100), released_checkpoint)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint(released_checkpoint: Path, tmp_path: Path, keep: float) -> None:
    data = released_checkpoint.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated or non-PyTorch"):
        load_pretrained(create_model("resnet20"), path)


def test_non_checkpoint_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(text)
    other = tmp_path / "other.pth"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        read_state_dict(other)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_code_is_refused(tmp_path: Path) -> None:
    marker, path = tmp_path / "executed", tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint") as exc:
        read_state_dict(path)
    assert "weights_only" not in str(exc.value)
    assert not marker.exists()


def test_wrapped_state_dict_is_unwrapped(released_checkpoint: Path, tmp_path: Path) -> None:
    state = read_state_dict(released_checkpoint)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    assert read_state_dict(path).keys() == state.keys()


def test_missing_checkpoint_gives_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*--checkpoint PATH"):
        load_pretrained(create_model("resnet20"), tmp_path / "nope.pth")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_record_describes_its_model(name: str) -> None:
    """Classes and input size give an output of that many classes; the full-precision patterns
    match exactly the ordinary convolutions and linear layers, never an adder layer."""
    record = model_record(name)
    model = create_model(name).eval()
    size = (3, 64, 64) if record.dataset == "imagenet" else record.input_size  # keep it quick
    with torch.no_grad():
        assert model(torch.zeros(1, *size)).shape == (1, record.num_classes)
    assert len(record.mean) == len(record.std) == record.input_size[0]
    weights = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    adders = {n for n, m in model.named_modules() if isinstance(m, Adder2d)}
    assert {n for n in weights if record.stays_full_precision(n)} == set(weights)
    assert not any(record.stays_full_precision(n) for n in adders)
    assert record.adder == bool(adders)
    for pattern in record.full_precision:
        assert any(fnmatchcase(n, pattern) for n in weights), pattern


def test_records_name_their_checkpoint_origin() -> None:
    released = [r for r in RECORDS.values() if r.pretrained]
    assert [r.name for r in released] == ["resnet20", "resnet20-cnn"]
    for r in released:
        assert r.url.startswith("https://github.com/") and len(r.sha256) == 64
        assert re.search(r"/raw/[0-9a-f]{40}/", r.url), "the URL pins a commit"
        assert r.origin and r.licence
    assert model_record("ResNet-20") is RECORDS["resnet20"]
    assert RECORDS["resnet20"].as_dict()["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("name", ["resnet20", "resnet20-cnn"])
def test_shared_checkpoints_match_their_records(name: str) -> None:
    record = model_record(name)
    path = Path(__file__).resolve().parents[1].parent / "shared" / "models" / record.file
    if not path.is_file():
        pytest.skip(f"{path} not available")
    assert file_digest(path) == record.sha256
    load_pretrained(create_model(name), path)  # every key fits the architecture
