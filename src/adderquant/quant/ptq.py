"""Post-training quantization of an adder network.

``quantize(model, config, calibration)``: calibrate (statistics of every adder layer's
input) → quantize every adder layer with the configured method (grouping, clamp, quantizers)
→ optional per-channel bias correction → optional BatchNorm re-estimation → report. Bias
correction comes first: re-estimated BatchNorm statistics already absorb the output offsets
that the correction removes, so a correction applied after them would shift the features by
that offset again. The first convolution and the classifier are ordinary convolutions and stay
in full precision. Runs are deterministic for a given ``config.seed``: every random choice
draws from its own ``torch.Generator`` (or seeded k-means), never from the global generator.

Calibration images come from :class:`CalibrationSet`: batches of ``calib_batch_size`` images
drawn (shuffled, crop + flip augmented, seeded) from the first ``calib_pool`` training images;
every pass over it (calibration, BatchNorm, bias correction) starts from the same seed.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adderquant.data import TensorLoader, load_dataset
from adderquant.nn import Adder2d
from adderquant.quant.bn import correct_adder_bias, model_device, reestimate_bn
from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.config import QuantConfig
from adderquant.quant.layers import adder_layers, replace_module
from adderquant.quant.mixed import allocate_mixed_precision, first_images
from adderquant.quant.registry import LayerCache, method_of, quantize_layer
from adderquant.quant.report import add_sqnr

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
FilterFn = Callable[[nn.Module, str], bool]
log = logging.getLogger(__name__)


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
        cls, cfg: QuantConfig, dataset: str = "cifar10", root: str | Path | None = None
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
    cfg: QuantConfig, extra_requests: Sequence[tuple[str, float]] = ()
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
    cfg: QuantConfig,
    extra_requests: Sequence[tuple[str, float]] = (),
    progress: bool = False,
) -> dict[str, ActivationObserver]:
    """Calibration statistics of every adder layer's input; they depend on the calibration
    settings only, so one call serves every bit width and method."""
    device = model_device(model)
    batches = ((x.to(device), y) for x, y in take_batches(calib, cfg.calib_batches))
    return calibrate(model, batches, observer_factory(cfg, extra_requests), progress)


def selected_layers(
    model: nn.Module, cfg: QuantConfig, filter_fn: FilterFn | None = None
) -> dict[str, Adder2d]:
    """The adder layers of ``model`` to quantize: those ``filter_fn(module, name)`` accepts
    (all without one). Raises ``ValueError`` when there are none or when ``cfg.layer_bits``
    names another layer."""
    layers = adder_layers(model)
    if not layers:
        raise ValueError("the model has no adder layers (adderquant.nn.Adder2d) to quantize")
    if filter_fn is not None:
        layers = {n: m for n, m in layers.items() if filter_fn(m, n)}
        if not layers:
            raise ValueError("filter_fn accepts none of the model's adder layers; nothing to "
                             "quantize")
    unknown = sorted(set(cfg.layer_bits) - set(layers))
    if unknown:
        raise ValueError(f"layer_bits names unknown adder layers {unknown}; "
                         f"the layers are {sorted(layers)}")
    return layers


def quantize_model(
    model: nn.Module,
    observers: dict[str, ActivationObserver],
    cfg: QuantConfig,
    prepared: dict[str, tuple[nn.Module, dict[str, Any]]] | None = None,
    cache: LayerCache | None = None,
    filter_fn: FilterFn | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` whose adder layers (those ``filter_fn`` accepts) are quantized by
    the method of ``cfg``, and the per-layer reports (without SQNR); ``prepared`` holds layers
    already quantized (with their reports) by name; ``cache`` shares quantized layers between
    calls."""
    names = set(selected_layers(model, cfg, filter_fn))
    missing = sorted(names - set(observers))
    if missing:
        raise ValueError(f"no calibration statistics for the adder layers {missing}")
    device = model_device(model)
    quantized = copy.deepcopy(model).cpu()
    reports = []
    for name, layer in adder_layers(quantized).items():
        if name not in names:
            continue
        if prepared and name in prepared:
            quant, report = prepared[name]
        else:
            quant, report = quantize_layer(name, layer, observers[name], cfg.bits_for(name),
                                           cfg, cache)
        replace_module(quantized, name, quant.cpu())
        reports.append(report)
    return quantized.to(device).eval(), reports


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Calibration,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """A quantized copy of ``model``: every adder layer (or those ``filter_fn(module, name)``
    accepts) quantized by the method ``config`` configures, e.g.
    ``quantize(model, AdderQuantConfig(bits=4), CalibrationSet.from_config(...))``.

    ``calibration``: a :class:`CalibrationSet` or an iterable of ``(images, labels)`` batches
    (read once per step that needs it). The configuration, the method and the layers are
    checked before any calibration. ``model`` (its weights and training mode) and the global
    random number generator are left as they were. :func:`quantize_with_report` also returns
    the per-layer report."""
    return quantize_with_report(model, config, calibration, filter_fn)[0]


def quantize_with_report(
    model: nn.Module,
    config: QuantConfig,
    calibration: Calibration,
    filter_fn: FilterFn | None = None,
    observers: dict[str, ActivationObserver] | None = None,
    progress: bool = False,
    cache: LayerCache | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`quantize`, returning ``(quantized model, report)``.

    ``observers``: statistics from an earlier :func:`collect_statistics` with the same
    calibration settings (skips the calibration pass); ``cache``: a
    :class:`~adderquant.quant.registry.LayerCache` shared by calls on the same model (a layer
    quantized the same way is quantized once). The report holds the configuration, per-layer
    figures and the seconds spent in each step.
    """
    method_of(config)  # a configuration of a registered method, before the calibration pass
    config.validate()
    selected_layers(model, config, filter_fn)
    training = model.training
    try:
        return _quantize_after_training(model.eval(), calibration, config, filter_fn,
                                        observers, progress, cache)
    finally:
        model.train(training)


def _quantize_after_training(
    model: nn.Module,
    calib: Calibration,
    cfg: QuantConfig,
    filter_fn: FilterFn | None,
    observers: dict[str, ActivationObserver] | None,
    progress: bool,
    cache: LayerCache | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The steps of :func:`quantize_with_report` on an eval-mode ``model``."""
    seconds: dict[str, float] = {}
    report: dict[str, Any] = {"config": cfg.as_dict(), "layers": [], "seconds": seconds}
    start = time.perf_counter()
    if observers is None:
        observers = collect_statistics(model, calib, cfg, progress=progress)
        seconds["calibrate"] = time.perf_counter() - start
        log.debug("calibrated %d adder layers on %d batches in %.1f s", len(observers),
                 cfg.calib_batches, seconds["calibrate"])
    if cfg.bit_budget is not None:
        start = time.perf_counter()
        images = first_images(take_batches(calib, cfg.mp_images), cfg.mp_images)
        layer_bits, report["mixed_precision"], prepared = allocate_mixed_precision(
            model, observers, images.to(model_device(model)), cfg, cache,
            set(selected_layers(model, cfg, filter_fn)),
        )
        cfg = cfg.replace(layer_bits=layer_bits)
        report["config"] = cfg.as_dict()
        seconds["mixed_precision"] = time.perf_counter() - start
        log.debug("mixed precision: %.2f bits on average", report["mixed_precision"]
                 ["average_bits"])
    else:
        prepared = None
    start = time.perf_counter()
    qmodel, layers = quantize_model(model, observers, cfg, prepared, cache, filter_fn)
    seconds["quantize"] = time.perf_counter() - start
    log.debug("quantized %d adder layers with %s in %.1f s", len(layers), cfg.method,
             seconds["quantize"])
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
