"""Datasets: IDX and CIFAR readers, the restricted unpickler, augmentation and batching."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from adderquant import hub
from adderquant.data import (
    NORMALISATION,
    CorruptDatasetError,
    DatasetNotFoundError,
    TensorLoader,
    UnsafePickleError,
    load_cifar,
    load_dataset,
    random_crop_flip,
    read_idx,
    safe_load,
)
from adderquant.data.fetch import SOURCES

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format's definition."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[big.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


def write_idx_split(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{IDX_TEST[0]}.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (folder / f"{IDX_TEST[1]}.gz").write_bytes(gzip.compress(idx_bytes(labels)))


def small_idx_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("train", [False, True])
def test_fashion_mnist_matches_the_idx_bytes(fashion_mnist_dir: Path, train: bool) -> None:
    images, labels = load_dataset("fashion-mnist", fashion_mnist_dir, train=train)
    prefix = "train" if train else "t10k"
    raw_images, raw_labels = (
        gzip.decompress((fashion_mnist_dir / f"{prefix}-{kind}-ubyte.gz").read_bytes())
        for kind in ("images-idx3", "labels-idx1")
    )
    n = 60000 if train else 10000
    assert struct.unpack(">4I", raw_images[:16]) == (2051, n, 28, 28)
    assert struct.unpack(">2I", raw_labels[:8]) == (2049, n)
    assert images.dtype == torch.uint8 and images.shape == (n, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    expected = np.frombuffer(raw_images, np.uint8, offset=16).reshape(n, 1, 28, 28)
    assert np.array_equal(images.numpy(), expected)
    assert np.array_equal(labels.numpy(), np.frombuffer(raw_labels, np.uint8, offset=8))
    assert labels.bincount().tolist() == [n // 10] * 10  # Fashion-MNIST is balanced


def pixel_mean_std(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1], from histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256)
                          for c in range(images.shape[1])]).double()
    n = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    return mean, var.sqrt()


def test_fashion_mnist_normalisation_constants(fashion_mnist_dir: Path) -> None:
    images, _ = load_dataset("fashion-mnist", fashion_mnist_dir, train=True)
    mean, std = pixel_mean_std(images)
    expected_mean, expected_std = NORMALISATION["fashion-mnist"]
    assert torch.allclose(mean, torch.tensor(expected_mean, dtype=torch.float64), atol=5e-4)
    assert torch.allclose(std, torch.tensor(expected_std, dtype=torch.float64), atol=5e-4)


def test_fashion_mnist_found_in_the_system_folder(
    fashion_mnist_dir: Path, no_path_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(hub.NO_SHARED_ENV, "1")
    images, labels = load_dataset("fashion-mnist", train=False)
    assert images.shape == (10000, 1, 28, 28) and labels[:3].tolist() == [9, 2, 1]


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_round_trips(tmp_path: Path, dtype: str, compressed: bool) -> None:
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    raw = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    out = read_idx(path)
    assert out.dtype.isnative and out.dtype == np.dtype(dtype).newbyteorder("=")
    assert np.array_equal(out, array)


def test_raw_and_gzip_files_load_alike(tmp_path: Path) -> None:
    images, labels = small_idx_split(12)
    write_idx_split(tmp_path / "gz", images, labels)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / IDX_TEST[0]).write_bytes(idx_bytes(images))
    (raw / IDX_TEST[1]).write_bytes(idx_bytes(labels))
    for folder in (tmp_path / "gz", raw):
        x, y = load_dataset("mnist", folder)
        assert np.array_equal(x.numpy(), images[:, None]) and np.array_equal(y.numpy(), labels)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x08\x03" + b[2:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "not an IDX file"),
        (lambda b: b[:3], "no header"),
        (lambda b: b[:10], "truncated IDX header"),
        (lambda b: b[: len(b) - 5], "truncated"),
        (lambda b: b + b"\0", "trailing bytes"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(CorruptDatasetError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_rejects_a_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8).reshape(5, 1000)))
    path = tmp_path / "x.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError, match="corrupted or truncated gzip"):
        read_idx(path)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "3 labels but .* 4 images"),
        (np.zeros((4, 28, 28), np.uint8), np.full(4, 10, np.uint8), "labels outside 0..9"),
        (np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.uint8), "expected uint8 \\(N, 28, 28\\)"),
        (np.zeros((4, 28, 28), ">f4"), np.zeros(4, np.uint8), "expected uint8 \\(N, 28, 28\\)"),
    ],
)
def test_idx_dataset_validates_contents(tmp_path: Path, images, labels, message: str) -> None:
    write_idx_split(tmp_path, images, labels)
    with pytest.raises(CorruptDatasetError, match=message):
        load_dataset("mnist", tmp_path)


def test_idx_dataset_search_order(
    tmp_path: Path, no_path_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag, env, shared, system = (tmp_path / d for d in ("flag", "env", "shared", "system"))
    for root, n in ((flag, 5), (env, 7), (shared, 9), (system, 11)):
        write_idx_split(root / "fashion-mnist", *small_idx_split(n))
    monkeypatch.setattr(hub, "SYSTEM_DATASETS", system)
    monkeypatch.setattr(hub, "shared_dir", lambda sub: shared)
    monkeypatch.setenv(hub.DATA_ENV, str(env))
    assert len(load_dataset("fashion-mnist", flag)[0]) == 5
    assert len(load_dataset("fashion-mnist", flag / "fashion-mnist")[0]) == 5
    assert len(load_dataset("fashion-mnist")[0]) == 7
    monkeypatch.delenv(hub.DATA_ENV)
    assert len(load_dataset("fashion-mnist")[0]) == 9
    monkeypatch.setattr(hub, "shared_dir", lambda sub: None)
    assert len(load_dataset("fashion-mnist")[0]) == 11
    monkeypatch.setattr(hub, "SYSTEM_DATASETS", tmp_path / "nowhere")
    write_idx_split(hub.cache_dir() / "data" / "fashion-mnist", *small_idx_split(13))
    assert len(load_dataset("fashion-mnist")[0]) == 13
    # An explicit folder is not silently replaced by another copy.
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", tmp_path / "empty")


def test_missing_idx_dataset_names_the_places_and_fixes(
    tmp_path: Path, no_path_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "SYSTEM_DATASETS", tmp_path / "system")
    monkeypatch.setenv(hub.NO_SHARED_ENV, "1")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", train=True)
    message = str(err.value)
    assert str(tmp_path / "system") in message and "downloads are off" in message
    cache = hub.cache_dir() / "data" / "fashion-mnist"
    for name, md5 in SOURCES["fashion-mnist"].files.items():
        assert f"{SOURCES['fashion-mnist'].url}{name} (md5 {md5}) and put it at {cache / name}" in (
            message)
    assert "apt-get install dataset-fashion-mnist" in message


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="cifar10, cifar100, mnist, fashion-mnist"):
        load_dataset("svhn")


# --------------------------------------------------------------------------- CIFAR


def trusted_batch(path: Path) -> dict:
    """A shared CIFAR batch read with the plain unpickler (trusted local file)."""
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def official_style_batch(data: np.ndarray, labels: list[int], key: bytes = b"labels") -> bytes:
    """A batch laid out as the official archive's: bytes keys, pickle protocol 2."""
    return pickle.dumps({b"batch_label": b"test", key: labels, b"data": data}, protocol=2)


def make_targz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_shared_copy(cifar10_dir: Path) -> None:
    images, labels = load_cifar(cifar10_dir, "cifar10", train=False)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert labels.bincount().tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
    raw = trusted_batch(cifar10_dir / "test_batch")
    assert np.array_equal(images.reshape(1000, -1).numpy(), raw["data"])


def test_cifar10_train_set_and_normalisation(shared_data_root: Path) -> None:
    images, labels = load_dataset("cifar10", shared_data_root, train=True)
    assert images.shape == (50000, 3, 32, 32) and labels[:5].tolist() == [6, 9, 9, 4, 1]
    assert labels.bincount().tolist() == [5000] * 10
    mean, std = pixel_mean_std(images)
    assert torch.allclose(mean, torch.tensor(NORMALISATION["cifar10"][0], dtype=torch.float64),
                          atol=5e-4)
    # CIFAR10_STD is the customary constant the released models use, not the pixel std.
    assert torch.allclose(std, torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64),
                          atol=5e-4)


def test_cifar10_archive_matches_the_folder(cifar10_dir: Path, tmp_path: Path) -> None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    members, expected = {}, {}
    for name in names:
        raw = trusted_batch(cifar10_dir / name)
        data, labels = raw["data"][:20], raw["labels"][:20]
        members[f"cifar-10-batches-py/{name}"] = official_style_batch(data, labels)
        expected[name] = (data.reshape(-1, 3, 32, 32), np.array(labels))
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_targz(archive, members)
    for root in (archive, tmp_path):
        images, labels = load_cifar(root, "cifar10", train=False)
        assert np.array_equal(images.numpy(), expected["test_batch"][0])
        assert np.array_equal(labels.numpy(), expected["test_batch"][1])
        images, labels = load_cifar(root, "cifar10", train=True)
        assert np.array_equal(images.numpy(), np.concatenate([expected[n][0] for n in names[:5]]))
        assert np.array_equal(labels.numpy(), np.concatenate([expected[n][1] for n in names[:5]]))


def test_cifar100_uses_fine_labels(cifar10_dir: Path, tmp_path: Path) -> None:
    data = trusted_batch(cifar10_dir / "test_batch")["data"][:30]
    fine = [(7 * i) % 100 for i in range(30)]
    files = {}
    for split in ("train", "test"):
        files[split] = pickle.dumps({
            b"filenames": [b"x.png"] * 30, b"batch_label": split.encode(),
            b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": data,
        }, protocol=2)
    files["meta"] = pickle.dumps({b"fine_label_names": [b"apple"] * 100}, protocol=2)
    archive = tmp_path / "archive" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    make_targz(archive, {f"cifar-100-python/{k}": v for k, v in files.items()})
    folder = tmp_path / "folder" / "cifar-100-python"
    folder.mkdir(parents=True)
    for k, v in files.items():
        (folder / k).write_bytes(v)
    for root in (archive.parent, folder.parent, folder):
        for train in (False, True):
            images, labels = load_dataset("cifar100", root, train=train)
            assert labels.tolist() == fine
            assert np.array_equal(images.reshape(30, -1).numpy(), data)
    x, _ = next(iter(TensorLoader(images, labels, "cifar100", batch_size=30)))
    mean, std = NORMALISATION["cifar100"]
    expected = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) / (
        torch.tensor(std).view(1, 3, 1, 1).double())
    assert torch.allclose(x.double(), expected, atol=1e-5)


def test_cifar100_is_not_found_in_a_cifar10_folder(cifar10_dir: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        load_cifar(cifar10_dir, "cifar100")


class Payload:
    """Pickles to a call of ``os.system`` that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_safe_load_refuses_code_and_does_not_run_it(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "executed"
    data = pickle.dumps({b"data": np.zeros(3), b"labels": Payload(marker)}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=r"refusing to load (os|posix)\.system"):
        safe_load(data, source="evil.pkl")
    assert not marker.exists()
    pickle.loads(data)  # the same bytes do run the command with the plain unpickler
    assert marker.exists()


@pytest.mark.parametrize(
    "obj", [Custom(), eval, {"x": [Custom()]}, np.array([Custom()], dtype=object)]
)
def test_safe_load_refuses_other_objects(obj) -> None:
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        safe_load(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_load_reads_arrays_and_containers(protocol: int) -> None:
    rng = np.random.default_rng(0)
    obj = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "f": np.float32(1.5),
           "i": np.arange(5), "set": {1, 2}, "t": (1, "a", b"b", 2.5, None, True)}
    out = safe_load(pickle.dumps(obj, protocol=protocol))
    assert out.keys() == obj.keys() and out["set"] == {1, 2} and out["t"] == obj["t"]
    assert np.array_equal(out[b"data"], obj[b"data"]) and out[b"data"].dtype == np.uint8
    assert np.array_equal(out["i"], obj["i"]) and out["f"] == np.float32(1.5)


def test_load_cifar_refuses_a_batch_carrying_code(cifar10_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": []}))
    with pytest.raises(UnsafePickleError) as err:
        load_cifar(tmp_path, "cifar10")
    assert str(folder / "test_batch") in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_cifar_batch_gives_a_clear_error(
    cifar10_dir: Path, tmp_path: Path, cut: float
) -> None:
    raw = (cifar10_dir / "test_batch").read_bytes()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(CorruptDatasetError, match="corrupted or truncated pickle") as err:
        load_cifar(tmp_path, "cifar10")
    assert isinstance(err.value, pickle.UnpicklingError)
    assert str(folder / "test_batch") in str(err.value)


def test_garbage_pickle_gives_a_clear_error() -> None:
    with pytest.raises(CorruptDatasetError, match="corrupted or truncated pickle"):
        safe_load(b"\x80\x04this is not a pickle", source="junk")


def test_truncated_cifar_archive_gives_a_clear_error(cifar10_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_targz(archive, {"cifar-10-batches-py/test_batch":
                         (cifar10_dir / "test_batch").read_bytes()})
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError, match="corrupted or truncated archive"):
        load_cifar(archive, "cifar10")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], "expected a dict"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing 'data' or 'labels'"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels outside 0..9"),
    ],
)
def test_malformed_cifar_batch(tmp_path: Path, batch, message: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(CorruptDatasetError, match=message):
        load_cifar(tmp_path, "cifar10")


def test_missing_cifar_gives_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert "--data DIR" in str(err.value) and "adderquant data fetch cifar10" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="not found under"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_1"):
        load_dataset("cifar10", tmp_path, train=True)


# --------------------------------------------------------------------------- augmentation


def crop_flip_per_image(images: np.ndarray, seed: int, padding: int) -> np.ndarray:
    """Zero-pad, slice and mirror each image, with the draws ``random_crop_flip`` documents."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).tolist()
    flip = (torch.rand(n, generator=g) < 0.5).tolist()
    out = np.empty_like(images)
    for i in range(n):
        padded = np.pad(images[i], ((0, 0), (padding, padding), (padding, padding)))
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


def test_random_crop_flip_matches_per_image_reference(cifar10_test) -> None:
    images = cifar10_test[0][:64]
    out = random_crop_flip(images, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert np.array_equal(out.numpy(), crop_flip_per_image(images.numpy(), 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_random_crop_flip_non_square_and_other_dtypes(dtype: torch.dtype) -> None:
    images = torch.arange(10 * 2 * 5 * 7).reshape(10, 2, 5, 7).to(dtype)
    out = random_crop_flip(images, torch.Generator().manual_seed(11), padding=2)
    assert out.dtype == dtype
    assert np.array_equal(out.numpy(), crop_flip_per_image(images.numpy(), 11, 2))


def test_random_crop_flip_is_seeded_and_covers_all_offsets() -> None:
    images = torch.arange(4000 * 9 * 9, dtype=torch.float32).reshape(4000, 1, 9, 9)
    a = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_crop_flip(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, random_crop_flip(images, torch.Generator().manual_seed(6)))
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (4000,), generator=g)
    dx = torch.randint(0, 9, (4000,), generator=g)
    flips = torch.rand(4000, generator=g) < 0.5
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9))
    assert 0.45 < flips.float().mean().item() < 0.55


# --------------------------------------------------------------------------- batching


def test_loader_batches_in_order_and_normalises(cifar10_test) -> None:
    images, labels = cifar10_test[0][:100], cifar10_test[1][:100]
    loader = TensorLoader(images, labels, "cifar10", batch_size=40)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [40, 40, 20]
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
                 for v in NORMALISATION["cifar10"])
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32
    assert torch.allclose(x.double(), (images.double() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_loader_shuffle_and_augment_are_seeded(cifar10_test) -> None:
    images, labels = cifar10_test[0][:50], torch.arange(50)

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(TensorLoader(images, labels, "cifar10", batch_size=16, shuffle=True,
                                 augment=True, seed=seed, num_batches=7))

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 7
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
               for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True))
    first_epoch = torch.cat([y for _, y in a[:4]])
    assert sorted(first_epoch.tolist()) == list(range(50))  # a permutation, then a new epoch
    assert len(a[4][1]) == 16


def test_loader_rejects_empty_data_and_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="empty"):
        TensorLoader(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0), "cifar10")
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1), "cifar10",
                     batch_size=0)
