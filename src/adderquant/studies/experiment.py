"""An experiment: a float model with its data splits, running quantization configurations.

An :class:`Experiment` holds a float model, its calibration images, the test subset and the
agreement images (training images never used for calibration), and caches the calibration
statistics, which depend on the calibration settings only.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adderquant.data import TensorLoader, load_dataset
from adderquant.quant.bn import model_device
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import QuantConfig
from adderquant.quant.fuse import fold_for_inference
from adderquant.quant.ptq import CalibrationSet, collect_statistics, quantize_with_report
from adderquant.quant.qat import qat as train_qat
from adderquant.quant.qat_config import QATConfig
from adderquant.quant.registry import LayerCache

FULL_PRECISION = "fp"  # the name of the float model's row
Batches = list[tuple[torch.Tensor, torch.Tensor]]
CALIBRATION_FIELDS = ("calib_batches", "calib_batch_size", "calib_augment", "calib_pool",
                      "sample_per_batch", "report_images", "seed")


@torch.no_grad()
def logits(model: nn.Module, batches: Batches) -> torch.Tensor:
    """The model's outputs for every image (CPU tensor). On the CPU with several threads, the
    batches are shared out among that many Python threads, each running single-threaded
    kernels (they release the GIL): one thread's Python work overlaps the others' kernels and
    each keeps its batch's activations in its own core's cache."""
    model.eval()
    threads = torch.get_num_threads()
    if threads == 1 or len(batches) < 2 or model_device(model).type != "cpu":
        return torch.cat([model(x).cpu() for x, _ in batches])

    def run(part: Batches) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(x) for x, _ in part]

    parts = [batches[i::threads] for i in range(threads)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            outs = list(pool.map(run, parts))
    finally:
        torch.set_num_threads(threads)
    ordered = [outs[i % threads][i // threads] for i in range(len(batches))]
    return torch.cat(ordered)


def predictions(model: nn.Module, batches: Batches) -> torch.Tensor:
    """Top-1 class of every image (CPU tensor)."""
    return logits(model, batches).argmax(dim=1)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over images of ``KL(softmax(reference) ‖ softmax(other))`` in nats, in float64."""
    p_log = torch.log_softmax(reference.double(), dim=1)
    q_log = torch.log_softmax(other.double(), dim=1)
    return float((p_log.exp() * (p_log - q_log)).sum(dim=1).mean())


EVAL_BATCH = 64  # small enough that a batch's activations stay in the CPU's caches


def to_batches(
    images: torch.Tensor, labels: torch.Tensor, dataset: str, device: torch.device,
    batch_size: int = EVAL_BATCH,
) -> Batches:
    """Normalised batches of ``images`` on ``device``, materialised once."""
    loader = TensorLoader(images, labels, dataset, batch_size=batch_size)
    return [(x.to(device), y) for x, y in loader]


@dataclass
class Experiment:
    """A float model with its data splits; runs configurations and caches calibration."""

    model: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test: Batches
    dataset: str = "cifar10"
    agreement_images: int = 0
    extra_requests: tuple[tuple[str, float], ...] = ()
    progress: bool = False
    _statistics: dict[tuple, dict[str, ActivationObserver]] = field(default_factory=dict)
    _agreement: Batches = field(default_factory=list)
    _reference: torch.Tensor | None = None
    _test_reference: torch.Tensor | None = None
    _layers: LayerCache = field(default_factory=LayerCache)

    @classmethod
    def load(
        cls, model: nn.Module, dataset: str = "cifar10", root: str | Path | None = None,
        test_limit: int | None = None, **kwargs: Any,
    ) -> Experiment:
        device = model_device(model)
        images, labels = load_dataset(dataset, root, train=False)
        if test_limit is not None:
            images, labels = images[:test_limit], labels[:test_limit]
        train_images, train_labels = load_dataset(dataset, root, train=True)
        test = to_batches(images, labels, dataset, device)
        return cls(model.eval(), train_images, train_labels, test, dataset, **kwargs)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def check_split(self, cfg: QuantConfig) -> None:
        """Calibration images (the first ``calib_pool``) and agreement images (the last
        ``agreement_images``) must not overlap."""
        n = len(self.train_images)
        if cfg.calib_pool + self.agreement_images > n:
            raise ValueError(
                f"calib_pool={cfg.calib_pool} plus {self.agreement_images} agreement images "
                f"exceed the {n} training images; lower one of them"
            )

    def calibration_set(self, cfg: QuantConfig) -> CalibrationSet:
        self.check_split(cfg)
        return CalibrationSet(self.train_images[: cfg.calib_pool],
                              self.train_labels[: cfg.calib_pool], self.dataset,
                              cfg.calib_batch_size, cfg.calib_augment, cfg.seed)

    def statistics(self, cfg: QuantConfig) -> dict[str, ActivationObserver]:
        """Calibration statistics for ``cfg``, computed once per calibration setting."""
        key = tuple(getattr(cfg, f) for f in CALIBRATION_FIELDS)
        needed = {("released", cfg.act_quantile), ("plain", cfg.act_quantile)}
        cached = self._statistics.get(key)
        if cached is None or not needed <= set(next(iter(cached.values())).quantile_maxima):
            requests = tuple(dict.fromkeys([*self.extra_requests, *sorted(needed)]))
            self.extra_requests = requests
            cached = collect_statistics(self.model, self.calibration_set(cfg), cfg, requests,
                                        self.progress)
            self._statistics[key] = cached
        return cached

    def agreement_batches(self) -> tuple[Batches, torch.Tensor]:
        """The last ``agreement_images`` training images and the float model's logits."""
        if self._reference is None:
            n = self.agreement_images
            self._agreement = to_batches(self.train_images[-n:], self.train_labels[-n:],
                                         self.dataset, self.device)
            self._reference = logits(self.model, self._agreement)
        return self._agreement, self._reference

    def run(
        self, cfg: QuantConfig | None, qat: QATConfig | None = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Quantize with ``cfg`` (``None``: the float model itself), then, with ``qat``, train
        the result by quantization-aware training (never on the agreement images: its held-out
        set covers them); returns the model and a
        row: top1 on the test subset and top-1 agreement with the float model there
        (``test_agreement``), top-1 agreement on the agreement images and the mean KL
        divergence of the outputs from the float model's there (``agreement``, ``kl`` in nats;
        if agreement images were asked for), mean layer SQNR and seconds."""
        start = time.perf_counter()
        float_row = cfg is None  # its outputs are the references
        if float_row:
            qmodel, report = copy.deepcopy(self.model), {"layers": []}
        else:
            observers = self.statistics(cfg)
            qmodel, report = quantize_with_report(
                self.model, cfg, self.calibration_set(cfg), observers=observers,
                progress=self.progress, cache=self._layers)
            if qat is not None:
                qat = qat.replace(holdout=max(qat.holdout, self.agreement_images), eval_images=0)
                qmodel, _ = train_qat(self.model, qmodel, qat, self.train_images,
                                      self.train_labels, self.dataset, progress=self.progress)
        labels = torch.cat([y for _, y in self.test])
        if self._test_reference is None:
            self._test_reference = predictions(self.model, self.test)
        scored = qmodel if float_row else fold_for_inference(qmodel)  # the same outputs
        predicted = self._test_reference if float_row else predictions(scored, self.test)
        row: dict[str, Any] = {
            "method": FULL_PRECISION if float_row else cfg.method,
            "bits": None if float_row else cfg.bits,
            "top1": 100.0 * float((predicted == labels).float().mean()),
            "test_agreement": 100.0 * float((predicted == self._test_reference).float().mean()),
        }
        if self.agreement_images:
            batches, reference = self.agreement_batches()
            out = reference if float_row else logits(scored, batches)
            row["agreement"] = 100.0 * float(
                (out.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
            row["kl"] = mean_kl(reference, out)
        sqnr = [e["sqnr_db"] for e in report["layers"] if "sqnr_db" in e]
        if sqnr:
            row["mean_sqnr_db"] = sum(sqnr) / len(sqnr)
        row["seconds"] = time.perf_counter() - start
        return qmodel, row
