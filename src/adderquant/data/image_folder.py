"""Image-folder datasets (ImageNet layout) with the standard ImageNet transforms.

``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``: classes are the sorted folder
names of the training split, each image is decoded with Pillow. Training images get
``RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3))`` and a horizontal flip with
probability 1/2; evaluation images are resized (shorter side 256, bilinear) and centre-cropped to
224, as torchvision's ImageNet reference recipe does. Samples are uint8 ``3 x 224 x 224``
tensors; normalisation happens batch-wise afterwards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from adderquant.data.errors import DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
CROP_SIZE = 224
RESIZE_SIZE = 256
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(left, top, crop width, crop height)`` of a RandomResizedCrop: up to 10 draws of an area
    in ``CROP_SCALE`` of the image and a log-uniform aspect ratio in ``CROP_RATIO``, then the
    central crop of the nearest admissible ratio."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random draws of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a uint8 ``3 x H x W`` tensor."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def train_transform(image: Image.Image, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop to 224 x 224 and a random horizontal flip."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, generator)
    image = image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
    if float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_uint8_tensor(image)


def eval_transform(image: Image.Image) -> torch.Tensor:
    """Resize the shorter side to 256 (bilinear), then the central 224 x 224 crop."""
    if image.width <= image.height:
        size = (RESIZE_SIZE, int(RESIZE_SIZE * image.height / image.width))
    else:
        size = (int(RESIZE_SIZE * image.width / image.height), RESIZE_SIZE)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((image.width - CROP_SIZE) / 2))
    top = int(round((image.height - CROP_SIZE) / 2))
    return to_uint8_tensor(image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE)))


def find_images(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list]:
    """``(classes, [(path, label), ...])`` of one split folder; ``classes`` fixes the labels
    (those of the training split) when given."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"image folder {split_dir} not found: an image-folder dataset needs "
            f"{split_dir.parent}/train/<class>/<image> and {split_dir.parent}/val/<class>/<image>;"
            " pass its root with --data DIR")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetNotFoundError(
            f"{split_dir} has class folders the training split lacks: {', '.join(unknown[:5])}")
    samples = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise DatasetNotFoundError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


class ImageFolder(torch.utils.data.Dataset):
    """Images of an image folder: ``dataset[i]`` is ``(uint8 3 x 224 x 224, label)``.

    With ``augment`` the random crop and flip of image ``i`` draw from a generator seeded by
    ``(seed, epoch, i)``: the same in any worker process and after a resume. Set ``epoch``
    before each pass.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples, self.classes = samples, classes
        self.augment, self.seed, self.epoch = False, 0, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as e:
            raise OSError(f"{path}: cannot decode the image ({e}); remove or replace it") from e
        if self.augment:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            return train_transform(image, generator), label
        return eval_transform(image), label


def load_image_folder(
    root: str | os.PathLike, train: bool, classes: list[str] | None = None
) -> ImageFolder:
    """The ``train`` or ``val`` split of the image folder at ``root``."""
    found, samples = find_images(Path(root) / ("train" if train else "val"), classes)
    return ImageFolder(samples, found)
