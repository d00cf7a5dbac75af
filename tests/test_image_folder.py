"""Image-folder datasets and the ImageNet transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from adderquant.data.errors import DatasetNotFoundError
from adderquant.data.image_folder import (
    CROP_RATIO,
    CROP_SCALE,
    eval_transform,
    random_resized_crop_box,
    to_uint8_tensor,
)
from adderquant.data.splits import load_training_data

SIZES = {"cat": [(300, 256), (256, 400), (231, 229)], "dog": [(512, 300), (260, 260)]}


def make_folder(root: Path) -> Path:
    """``root/train/<class>/`` with the images of SIZES (random pixels) and a one-image val."""
    gen = torch.Generator().manual_seed(0)
    for split, classes in (("train", SIZES), ("val", {"dog": [(280, 240)]})):
        for name, sizes in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_labels_and_sample_shapes(tmp_path: Path):
    data = load_training_data("image-folder", make_folder(tmp_path))
    assert data.num_classes == 2 and len(data.train) == 5 and len(data.val) == 1
    labels = [label for _, label in data.train.dataset.samples]
    assert labels == [0, 0, 0, 1, 1]
    assert data.val.dataset.samples[0][1] == 1  # val's "dog" keeps the training split's label
    assert data.train.sample_shape == (3, 224, 224)
    x, y = next(data.train.batches(4, epoch=0, seed=1, augment=True))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 224, 224) and len(y) == 4
    again, _ = next(data.train.batches(4, epoch=0, seed=1, augment=True))
    other, _ = next(data.train.batches(4, epoch=1, seed=1, augment=True))
    assert torch.equal(x, again) and not torch.equal(x, other)
    held = load_training_data("image-folder", tmp_path, val_split=2)
    assert len(held.train) == 3 and [s[1] for s in held.val.dataset.samples] == [1, 1]


def test_eval_transform_resizes_the_shorter_side_then_crops_the_centre():
    image = Image.fromarray(torch.arange(300 * 512 * 3, dtype=torch.int64).remainder(251)
                            .to(torch.uint8).view(300, 512, 3).numpy())
    out = eval_transform(image)
    resized = image.resize((int(256 * 512 / 300), 256), Image.Resampling.BILINEAR)
    left = round((resized.width - 224) / 2)
    expected = to_uint8_tensor(resized)[:, 16:240, left:left + 224]
    assert torch.equal(out, expected)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    gen = torch.Generator().manual_seed(0)
    for width, height in ((500, 375), (224, 224), (1000, 200)):
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, gen)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if (w, h) != (width, height) and not (w == width or h == height):
                area = w * h / (width * height)
                assert CROP_SCALE[0] * 0.9 <= area <= CROP_SCALE[1]
                assert CROP_RATIO[0] * 0.9 <= w / h <= CROP_RATIO[1] * 1.1
    # an extreme panorama falls back to the central crop of the widest allowed ratio
    assert random_resized_crop_box(4000, 10, torch.Generator().manual_seed(0)) == (
        (4000 - 13) // 2, 0, 13, 10)


def test_missing_or_empty_folders_say_what_is_expected(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="train/<class>/<image>"):
        load_training_data("image-folder", tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        load_training_data("image-folder", tmp_path)
