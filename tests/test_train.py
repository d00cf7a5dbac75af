"""Training: the recipes, resume, the run folder, the command line and its errors."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from adderquant.cli import main
from adderquant.data.splits import MemorySplit, TrainingData, load_training_data
from adderquant.evaluate import evaluate
from adderquant.models import create_model
from adderquant.train import (
    Processes,
    RunFolder,
    RunIdentity,
    TrainConfig,
    build_config,
    cosine_lr,
    fit,
    from_environment,
    read_config_file,
    recipe,
)
from adderquant.train.loop import steps_per_epoch
from adderquant.train.recipe import CosineFactor

FMNIST_NORM = ((0.2860,), (0.3530,))
LENET = RunIdentity("lenet5", "fashion-mnist", 10)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data(n_train: int = 96, n_val: int = 32, seed: int = 0) -> TrainingData:
    """Random 28 x 28 images whose label is the brightest of ten horizontal bands."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> MemorySplit:
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = torch.randint(0, 100, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            images[i, 0, 2 * label + 4: 2 * label + 7] = 250
        return MemorySplit(images, labels)

    return TrainingData(split(n_train), split(n_val), None, 10, "test")


def write_idx_dataset(root: Path, name: str, n_train: int, n_test: int) -> None:
    """Tiny MNIST-layout IDX files (gzip) under ``root/name``, from :func:`tiny_data`."""
    data = tiny_data(n_train, n_test)
    folder = root / name
    folder.mkdir(parents=True)
    for prefix, split in (("train", data.train), ("t10k", data.val)):
        n = len(split)
        images = struct.pack(">4I", 0x0803, n, 28, 28) + split.images.numpy().tobytes()
        labels = struct.pack(">2I", 0x0801, n) + split.labels.to(torch.uint8).numpy().tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def test_cosine_schedule_matches_released_formula():
    for epoch in (0, 17, 200, 399):
        expected = 0.05 * (1 + math.cos(math.pi * epoch / 400))
        assert cosine_lr(0.1, epoch, 400) == pytest.approx(expected)
    factor = CosineFactor(total=100, warmup=10)
    assert [factor(t) for t in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == 1.0 and factor(55) == pytest.approx(0.5)


def test_recipe_defaults_follow_the_paper_per_dataset():
    cifar = recipe("cifar10")
    assert (cifar.epochs, cifar.batch_size, cifar.lr, cifar.momentum, cifar.nesterov,
            cifar.weight_decay, cifar.augment, cifar.eta) == (
        400, 256, 0.1, 0.9, False, 5e-4, True, 0.2)
    assert recipe("cifar100") == cifar
    for name in ("mnist", "fashion-mnist"):
        r = recipe(name)
        assert (r.epochs, r.batch_size, r.lr, r.momentum, r.nesterov, r.weight_decay,
                r.augment, r.eta) == (50, 256, 0.1, 0.9, True, 5e-4, False, 0.2)
    folder = recipe("image-folder")
    assert (folder.epochs, folder.batch_size, folder.lr, folder.nesterov, folder.weight_decay,
            folder.augment) == (150, 256, 0.1, True, 1e-4, True)
    assert TrainConfig() == cifar  # the dataclass defaults are the CIFAR recipe


def test_config_file_and_flags_override_the_recipe(tmp_path: Path):
    (tmp_path / "run.yaml").write_text("lr: 0.05\nepochs: 30\nweight-decay: 0.0001\neta: null\n")
    (tmp_path / "run.json").write_text(json.dumps({"lr": 0.2, "batch_size": 128}))
    from_yaml = read_config_file(tmp_path / "run.yaml")
    cfg = build_config("cifar10", from_yaml, {"epochs": 12})
    assert (cfg.lr, cfg.epochs, cfg.weight_decay, cfg.eta, cfg.batch_size) == (
        0.05, 12, 1e-4, None, 256)
    cfg = build_config("mnist", read_config_file(tmp_path / "run.json"))
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.nesterov) == (0.2, 128, 50, True)


@pytest.mark.parametrize("text, match", [
    ("lr: 0.1\nlearning_rate: 3\n", "unknown settings learning_rate"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("epochs: 2.5\n", "epochs must be an integer"),
    ("lr: -1\n", "lr must be a finite number above 0"),
    ("warmup_epochs: 400\n", "warmup_epochs .400. must be fewer than epochs"),
    ("augment: yes please\n", "augment must be true or false"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_bad_config_files_are_refused(tmp_path: Path, text: str, match: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        build_config("cifar10", read_config_file(path))


def test_recipe_refuses_what_the_dataset_lacks():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        recipe("svhn")
    with pytest.raises(ValueError, match="fashion-mnist has no standard augmentation"):
        build_config("fashion-mnist", {"augment": True})
    with pytest.raises(ValueError, match="nesterov needs a momentum"):
        TrainConfig(momentum=0.0, nesterov=True)


def test_batch_not_divisible_by_the_processes_is_refused():
    cfg = TrainConfig(epochs=1, batch_size=100)
    with pytest.raises(ValueError, match="batch size 100 is not divisible by the 3 processes"):
        fit(create_model("lenet5"), tiny_data(), cfg, LENET, FMNIST_NORM,
            processes=Processes(rank=0, world=3))


def test_launcher_variables_are_read_and_checked():
    assert from_environment({}) == Processes()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1234"}
    assert from_environment(env) == Processes(1, 2, 1)
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT are not"):
        from_environment({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(RuntimeError, match="bad process layout"):
        from_environment({**env, "RANK": "2"})


def test_steps_per_epoch_count_the_distributed_samplers_share():
    assert steps_per_epoch(96, 32, 1) == 3
    assert steps_per_epoch(97, 32, 1) == 4
    assert steps_per_epoch(97, 16, 2) == 4  # 49 images each (one repeated), batches of 16


def test_two_epochs_equal_one_then_resume_then_one(tmp_path: Path, one_thread):
    """A run stopped after epoch 1 and resumed (into a model built from another seed) ends
    with the same weights, optimizer state and log as the run that went straight through."""
    data = tiny_data()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, augment=True, seed=3)

    torch.manual_seed(0)
    straight = create_model("lenet5")
    whole = fit(straight, data, cfg, LENET, FMNIST_NORM, folder=RunFolder(tmp_path / "a"))

    torch.manual_seed(0)
    first = fit(create_model("lenet5"), data, cfg, LENET, FMNIST_NORM,
                folder=RunFolder(tmp_path / "b"), stop_after=1)
    assert not first.finished and len(first.history) == 1
    assert not (tmp_path / "b" / "model.pth").exists()
    torch.manual_seed(99)
    resumed = create_model("lenet5")
    rest = fit(resumed, data, cfg, LENET, FMNIST_NORM, folder=RunFolder(tmp_path / "b"),
               resume=tmp_path / "b" / "last.pt")
    assert rest.finished

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["conv2.adder"], create_model("lenet5").state_dict()["conv2.adder"])

    def numbers(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                for r in rows]

    assert numbers(rest.history) == numbers(whole.history)
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in "ab"]
    assert numbers(logs[0]) == numbers(logs[1]) and len(logs[0]) == 2
    saved = [torch.load(tmp_path / d / "last.pt", weights_only=True) for d in "ab"]
    assert saved[0]["epoch"] == saved[1]["epoch"] == 2
    for x, y in zip(saved[0]["optimizer"]["state"].values(),
                    saved[1]["optimizer"]["state"].values(), strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert saved[0]["schedule"]["last_epoch"] == 2 * steps_per_epoch(96, 32, 1)
    final = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(final[k], b[k]) for k in b)


def test_best_checkpoint_holds_the_best_validation_epoch(tmp_path: Path, one_thread):
    torch.manual_seed(1)
    result = fit(create_model("lenet5"), tiny_data(), TrainConfig(epochs=3, batch_size=32,
                 lr=0.05, augment=False), LENET, FMNIST_NORM, folder=RunFolder(tmp_path))
    top1 = [row["val_top1"] for row in result.history]
    assert result.best == {"epoch": top1.index(max(top1)) + 1, "val_top1": max(top1)}
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == result.best["epoch"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_another_runs_checkpoint(tmp_path: Path, one_thread):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=32, augment=False)
    fit(create_model("lenet5"), tiny_data(), cfg, LENET, FMNIST_NORM,
        folder=RunFolder(tmp_path), stop_after=1)
    other = RunIdentity("resnet20", "cifar10", 10)
    with pytest.raises(ValueError, match="checkpoint of lenet5 on fashion-mnist .* not of "
                                         "resnet20 on cifar10"):
        fit(create_model("resnet20"), tiny_data(), cfg, other, FMNIST_NORM,
            resume=tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"other settings \(lr 0.1 -> 0.2\)"):
        fit(create_model("lenet5"), tiny_data(), TrainConfig(epochs=2, batch_size=32, lr=0.2,
            augment=False), LENET, FMNIST_NORM, resume=tmp_path / "last.pt")
    torch.save(create_model("lenet5").state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not an adderquant training checkpoint"):
        fit(create_model("lenet5"), tiny_data(), cfg, LENET, FMNIST_NORM,
            resume=tmp_path / "weights.pth")


def test_validation_split_holds_out_the_last_training_images(tmp_path: Path):
    write_idx_dataset(tmp_path, "mnist", 50, 20)
    data = load_training_data("mnist", tmp_path, val_split=8)
    full = load_training_data("mnist", tmp_path)
    assert len(data.train) == 42 and len(data.val) == 8 and len(data.test) == 20
    assert torch.equal(data.val.images, full.train.images[-8:])
    assert full.test is None and torch.equal(full.val.labels, data.test.labels)
    with pytest.raises(ValueError, match="must hold out fewer than the 50"):
        load_training_data("mnist", tmp_path, val_split=50)


def test_cli_trains_writes_the_run_folder_and_resumes(tmp_path: Path, capsys, one_thread):
    write_idx_dataset(tmp_path / "data", "mnist", 64, 32)
    out = tmp_path / "run"
    args = ["train", "--model", "lenet5", "--dataset", "mnist", "--data", str(tmp_path / "data"),
            "--out", str(out), "--epochs", "2", "--batch-size", "32", "--val-split", "16",
            "--json"]
    assert main([*args, "--stop-after", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["finished"] and report["config"]["nesterov"] is True  # MNIST recipe
    assert report["validation"] == "last 16 training images"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt",
                                                     "log.jsonl"]
    assert main([*args, "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finished"] and [r["epoch"] for r in report["epochs"]] == [1, 2]
    assert report["test"]["images"] == 32
    model = create_model("lenet5")
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    assert main([*args, "--resume", "--lr", "0.3"]) == 2
    assert "a resumed run keeps its settings" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--model", "resnet99"], ["--dataset", "svhn"]])
def test_cli_unknown_model_or_dataset_exits_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--out", str(tmp_path / "run"), *args])
    assert caught.value.code == 2
    assert f"invalid choice: '{args[1]}'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet20", "--dataset", "mnist"], "resnet20 takes 3x32x32 images, mnist has "
                                                    "1x28x28"),
    (["--dataset", "mnist", "--augment"], "mnist has no standard augmentation"),
    (["--dataset", "mnist", "--resume"], "no checkpoint to resume"),
    (["--dataset", "image-folder"], "image-folder dataset needs --data DIR"),
])
def test_cli_bad_settings_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    write_idx_dataset(tmp_path / "data", "mnist", 16, 8)
    data = [] if "image-folder" in args else ["--data", str(tmp_path / "data")]
    assert main(["train", "--out", str(tmp_path / "run"), *data, *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_resume_from_another_models_checkpoint_is_refused(tmp_path, capsys, one_thread):
    write_idx_dataset(tmp_path / "data", "mnist", 32, 16)
    common = ["train", "--dataset", "mnist", "--data", str(tmp_path / "data"), "--epochs", "2",
              "--batch-size", "16", "--json"]
    assert main([*common, "--out", str(tmp_path / "a"), "--stop-after", "1"]) == 0
    capsys.readouterr()
    code = main(["train", "--model", "resnet20", "--dataset", "cifar10", "--out",
                 str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "last.pt")])
    assert code == 2
    assert "is a checkpoint of lenet5 on mnist (10 classes), not of resnet20 on cifar10" in (
        capsys.readouterr().err)


def test_lenet_learns_fashion_mnist(one_thread):
    try:
        data = load_training_data("fashion-mnist", limit=4000)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    data = TrainingData(data.train, data.val.first(2000), None, 10, "test")
    torch.manual_seed(0)
    model = create_model("lenet5")
    before = evaluate(model, _batches(data.val), progress=False)
    result = fit(model, data, TrainConfig(epochs=2, batch_size=64, nesterov=True, augment=False),
                 LENET, FMNIST_NORM)
    after = evaluate(model, _batches(data.val), progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert after.top1 > 60.0 and after.top1 > before.top1 + 30.0
    assert after.top1 == pytest.approx(result.history[-1]["val_top1"])


def _batches(split: MemorySplit):
    from adderquant.data.transforms import normalize

    for x, y in split.eval_batches(500):
        yield normalize(x, *FMNIST_NORM), y
