"""Post-training quantization of an adder network.

``ptq(model, calib, config)``: calibrate (statistics of every adder layer's input) → quantize
every adder layer with the configured method (grouping, clamp, quantizers) → optional
per-channel bias correction → optional BatchNorm re-estimation → report. Bias correction comes
first: re-estimated BatchNorm statistics already absorb the output offsets that the correction
removes, so a correction applied after them would shift the features by that offset again. The first
convolution and the classifier are ordinary convolutions and stay in full precision. Runs are
deterministic for a given ``config.seed``.

Calibration images come from :class:`CalibrationSet`: batches of ``calib_batch_size`` images
drawn (shuffled, crop + flip augmented, seeded) from the first ``calib_pool`` training images;
every pass over it (calibration, BatchNorm, bias correction) starts from the same seed.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adderquant.data import TensorLoader, load_dataset
from adderquant.quant.bn import correct_adder_bias, model_device, reestimate_bn
from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.config import PTQConfig
from adderquant.quant.layers import adder_layers, replace_module
from adderquant.quant.methods import FULL_PRECISION, LayerCache, get_method, quantize_layer
from adderquant.quant.mixed import allocate_mixed_precision, first_images
from adderquant.quant.report import add_sqnr

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CalibrationSet:
    """Training images from which calibration batches are drawn."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    batch_size: int = 128
    augment: bool = True
    seed: int = 0

    def batches(self, count: int) -> TensorLoader:
        """``count`` batches, the same ones on every call."""
        return TensorLoader(
            self.images, self.labels, self.dataset, batch_size=self.batch_size, shuffle=True,
            augment=self.augment, seed=self.seed, num_batches=count,
        )

    @classmethod
    def from_config(
        cls, cfg: PTQConfig, dataset: str = "cifar10", root: str | Path | None = None
    ) -> CalibrationSet:
        """The first ``cfg.calib_pool`` training images of ``dataset``."""
        images, labels = load_dataset(dataset, root, train=True)
        if cfg.calib_pool > len(images):
            raise ValueError(
                f"calib_pool={cfg.calib_pool} exceeds the {len(images)} training images"
            )
        return cls(images[: cfg.calib_pool], labels[: cfg.calib_pool], dataset,
                   cfg.calib_batch_size, cfg.calib_augment, cfg.seed)


Calibration = CalibrationSet | Batches


def take_batches(calib: Calibration, count: int) -> Batches:
    """``count`` batches of a :class:`CalibrationSet`, or the first ``count`` of an iterable."""
    if isinstance(calib, CalibrationSet):
        return calib.batches(count)
    return itertools.islice(calib, count)


def observer_factory(
    cfg: PTQConfig, extra_requests: Sequence[tuple[str, float]] = ()
) -> Callable[[], ActivationObserver]:
    """Observers tracking the quantiles ``cfg`` (and ``extra_requests``) need."""
    requests = (("released", cfg.act_quantile), ("plain", cfg.act_quantile), *extra_requests)

    def make() -> ActivationObserver:
        return ActivationObserver(
            quantile=cfg.act_quantile, sample_per_batch=cfg.sample_per_batch,
            keep_images=cfg.report_images, seed=cfg.seed, requests=requests,
        )

    return make


def collect_statistics(
    model: nn.Module,
    calib: Calibration,
    cfg: PTQConfig,
    extra_requests: Sequence[tuple[str, float]] = (),
    progress: bool = False,
) -> dict[str, ActivationObserver]:
    """Calibration statistics of every adder layer's input; they depend on the calibration
    settings only, so one call serves every bit width and method."""
    device = model_device(model)
    batches = ((x.to(device), y) for x, y in take_batches(calib, cfg.calib_batches))
    return calibrate(model, batches, observer_factory(cfg, extra_requests), progress)


def quantize_model(
    model: nn.Module,
    observers: dict[str, ActivationObserver],
    cfg: PTQConfig,
    prepared: dict[str, tuple[nn.Module, dict[str, Any]]] | None = None,
    cache: LayerCache | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` whose adder layers are quantized by ``cfg.method``, and the
    per-layer reports (without SQNR); ``prepared`` holds layers already quantized (with
    their reports) by name; ``cache`` shares quantized layers between calls."""
    layers = adder_layers(model)
    if not layers:
        raise ValueError("the model has no adder layers (adderquant.nn.Adder2d) to quantize")
    unknown = sorted(set(cfg.layer_bits) - set(layers))
    if unknown:
        raise ValueError(f"layer_bits names unknown adder layers {unknown}; "
                         f"the layers are {sorted(layers)}")
    missing = sorted(set(layers) - set(observers))
    if missing:
        raise ValueError(f"no calibration statistics for the adder layers {missing}")
    device = model_device(model)
    quantized = copy.deepcopy(model).cpu()
    reports = []
    for name, layer in adder_layers(quantized).items():
        if prepared and name in prepared:
            quant, report = prepared[name]
        else:
            quant, report = quantize_layer(name, layer, observers[name], cfg.bits_for(name),
                                           cfg, cache)
        replace_module(quantized, name, quant.cpu())
        reports.append(report)
    return quantized.to(device).eval(), reports


def ptq(
    model: nn.Module,
    calib: Calibration,
    cfg: PTQConfig,
    observers: dict[str, ActivationObserver] | None = None,
    progress: bool = False,
    cache: LayerCache | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model`` after training; returns ``(quantized model, report)``.

    ``calib``: a :class:`CalibrationSet` or an iterable of ``(images, labels)`` batches.
    ``observers``: statistics from an earlier :func:`collect_statistics` with the same
    calibration settings (skips the calibration pass); ``cache``: a
    :class:`~adderquant.quant.methods.LayerCache` shared by calls on the same model (a layer
    quantized the same way is quantized once). The report holds the configuration, per-layer
    figures and the seconds spent in each step. The caller's random number generator and the
    model's training mode are left as they were.
    """
    cfg.validate()
    if cfg.method != FULL_PRECISION:
        get_method(cfg.method)  # a misspelled method fails before the calibration pass
    training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            return _quantize_after_training(model.eval(), calib, cfg, observers, progress,
                                            cache)
        finally:
            model.train(training)


def _quantize_after_training(
    model: nn.Module,
    calib: Calibration,
    cfg: PTQConfig,
    observers: dict[str, ActivationObserver] | None,
    progress: bool,
    cache: LayerCache | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The steps of :func:`ptq` on an eval-mode ``model``."""
    seconds: dict[str, float] = {}
    report: dict[str, Any] = {"config": cfg.as_dict(), "layers": [], "seconds": seconds}
    if cfg.method == FULL_PRECISION:
        return copy.deepcopy(model), report
    start = time.perf_counter()
    if observers is None:
        observers = collect_statistics(model, calib, cfg, progress=progress)
        seconds["calibrate"] = time.perf_counter() - start
    if cfg.bit_budget is not None:
        start = time.perf_counter()
        images = first_images(take_batches(calib, cfg.mp_images), cfg.mp_images)
        layer_bits, report["mixed_precision"], prepared = allocate_mixed_precision(
            model, observers, images.to(model_device(model)), cfg, cache
        )
        cfg = cfg.replace(layer_bits=layer_bits)
        report["config"] = cfg.as_dict()
        seconds["mixed_precision"] = time.perf_counter() - start
    else:
        prepared = None
    start = time.perf_counter()
    qmodel, layers = quantize_model(model, observers, cfg, prepared, cache)
    seconds["quantize"] = time.perf_counter() - start
    if cfg.bias_correction != "none":
        start = time.perf_counter()
        corrections = correct_adder_bias(
            qmodel, model, take_batches(calib, cfg.bias_correction_batches),
            inputs=cfg.bias_correction.removesuffix("-input"), progress=progress,
        )
        for entry in layers:
            entry["bias_correction_mean_abs"] = float(corrections[entry["layer"]].abs().mean())
        seconds["bias_correction"] = time.perf_counter() - start
    if cfg.bn_reestimate:
        start = time.perf_counter()
        reestimate_bn(qmodel, take_batches(calib, cfg.bn_batches), cfg.bn_momentum, progress,
                      cfg.bn_negligible_weight)
        seconds["bn_reestimate"] = time.perf_counter() - start
    start = time.perf_counter()
    add_sqnr(layers, model, qmodel, {n: o.kept_inputs for n, o in observers.items()})
    seconds["report"] = time.perf_counter() - start
    report["layers"] = layers
    return qmodel, report
