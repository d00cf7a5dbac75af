"""Quantization-aware training (QAT) of a quantized adder network.

``qat(model, quantized, cfg, images, labels, dataset)`` trains a copy of ``quantized`` (a model
whose adder layers are :class:`~adderquant.quant.layers.QuantAdder2d`, as :func:`ptq` makes)
with every adder layer replaced by a :class:`~adderquant.quant.qat_layer.QATAdder2d`, and
returns a model of the same kind as ``quantized`` with the trained codes, steps and biases.

Recipe (defaults in :class:`~adderquant.quant.qat_config.QATConfig`):

1. BatchNorm statistics refreshed in train mode on the quantized model (cumulative average over
   ``bn_refresh_batches`` batches of training images with the training augmentation, the
   images the float model's own statistics come from: :func:`refresh_batches`), kept only if
   they lower the KL to the float model's logits on those images (``bn_refresh_check``).
2. Adam with a cosine learning rate (after an optional linear warmup); the adder layers' rate
   is in units of their grid step.
   Loss: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` to the float model's logits ``t`` (or
   cross-entropy). BatchNorm in train mode.
3. For the last ``bn_freeze`` of the steps: statistics refreshed again (and checked), then
   frozen (eval mode); ``bn_freeze=1``: frozen throughout.

Data: the training images except the last ``holdout`` (never trained on), in ``views`` fixed
augmentations (pad-4 crop + flip per image, seeded; where the dataset's training recipe has
that augmentation, or ``augment`` asks for it); epoch ``e`` shuffles (seeded by ``e``) view
``e % views``. The float model's logits are computed once per image and view and kept.
After every epoch the trained model is converted and scored on the held-out images (top-1
agreement with the float model, mean KL of its outputs) and a checkpoint is written
atomically; ``resume`` continues from it (the same result as an uninterrupted run).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adderquant._io import write_torch_atomic
from adderquant.data.splits import AUGMENTATIONS
from adderquant.data.transforms import NORMALISATION, normalize
from adderquant.quant.layers import QuantAdder2d, replace_module
from adderquant.quant.qat_config import QATConfig
from adderquant.quant.qat_layer import QATAdder2d

CHECKPOINT_FORMAT = "adderquant-qat-checkpoint"
CHECKPOINT_VERSION = 1
EVAL_BATCH = 250
PAD = 4


# --------------------------------------------------------------------------- model conversion


def to_trainable(quantized: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """A copy of ``quantized`` with every ``QuantAdder2d`` replaced by a ``QATAdder2d``
    (latent weights from ``model``'s float adder layer of the same name where it rounds to the
    same codes)."""
    floats = dict(model.named_modules()) if model is not None else {}
    student = copy.deepcopy(quantized).cpu()
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantAdder2d)}
    if not layers:
        raise ValueError("the model has no quantized adder layers; quantize it first "
                         "(adderquant ptq)")
    for name, layer in layers.items():
        source = floats.get(name)
        weight = getattr(source, "adder", None)
        replace_module(student, name, QATAdder2d.from_quant(layer, weight))
    return student


def to_quantized(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with every ``QATAdder2d`` converted to its ``QuantAdder2d``, in
    eval mode: the kind of model :func:`~adderquant.quant.ptq.ptq` returns."""
    out = copy.deepcopy(student)
    for name, m in list(out.named_modules()):
        if isinstance(m, QATAdder2d):
            replace_module(out, name, m.to_quant())
    return out.eval()


def set_true_gradient(student: nn.Module, on: bool) -> None:
    for m in student.modules():
        if isinstance(m, QATAdder2d):
            m.true_gradient = on


# --------------------------------------------------------------------------- data


class AugmentedViews:
    """Fixed pad-4 crop + flip augmentations of ``images`` (uint8 N x C x H x W): view ``v``
    draws every image's offsets and flip from a generator seeded by ``(seed, v)``. With
    ``augment`` false every view is the images themselves."""

    def __init__(self, images: torch.Tensor, seed: int, augment: bool = True) -> None:
        self.images, self.seed, self.augment = images, seed, augment
        self._params: dict[int, tuple[torch.Tensor, ...]] = {}

    def params(self, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if view not in self._params:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + view)
            n = len(self.images)
            self._params[view] = (torch.randint(0, 2 * PAD + 1, (n,), generator=g),
                                  torch.randint(0, 2 * PAD + 1, (n,), generator=g),
                                  torch.rand(n, generator=g) < 0.5)
        return self._params[view]

    def batch(self, view: int, idx: torch.Tensor) -> torch.Tensor:
        """The images ``idx`` of view ``view`` (uint8)."""
        if not self.augment:
            return self.images[idx]
        dy, dx, flip = (p[idx] for p in self.params(view))
        x = self.images[idx]
        n, c, h, w = x.shape
        padded = F.pad(x, (PAD,) * 4)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = dx.view(n, 1) + torch.arange(w).view(1, w)
        cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
        return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, -1, 1, 1),
                      rows, cols]


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, prepare: Callable) -> torch.Tensor:
    """``model``'s outputs for uint8 ``images`` (eval mode), ``EVAL_BATCH`` at a time."""
    model.eval()
    return torch.cat([model(prepare(images[i:i + EVAL_BATCH]))
                      for i in range(0, len(images), EVAL_BATCH)])


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over images of ``KL(softmax(reference) ‖ softmax(other))`` in nats (float64)."""
    p_log = torch.log_softmax(reference.double(), dim=1)
    q_log = torch.log_softmax(other.double(), dim=1)
    return float((p_log.exp() * (p_log - q_log)).sum(dim=1).mean())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over the batch."""
    p_log = torch.log_softmax(teacher / t, dim=1)
    q_log = torch.log_softmax(student / t, dim=1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=1).mean() * (t * t)


# --------------------------------------------------------------------------- training pieces


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def refresh_batches(views: AugmentedViews, cfg: QATConfig,
                    prepare: Callable) -> list[torch.Tensor]:
    """The batches of a BatchNorm refresh: ``cfg.bn_refresh_batches`` batches (at most one
    epoch) of the training images in view 0 of ``views``, that is, with the training
    augmentation where the dataset's recipe has one. The float model's statistics were
    gathered on augmented images, so the student's must be too: refreshed on un-augmented
    images, the released ResNet-20 itself moves away from its own outputs (held-out KL
    0.09 nats, against 0.0004 on augmented ones), more than 3-bit quantization moves it."""
    return [prepare(views.batch(0, idx)) for idx in refresh_indices(len(views.images), cfg)]


def refresh_indices(n: int, cfg: QATConfig) -> list[torch.Tensor]:
    """The image indices of :func:`refresh_batches`' batches among ``n`` training images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    count = min(cfg.bn_refresh_batches, max(1, n // cfg.batch_size))
    return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(count)]


@torch.no_grad()
def refresh_bn(student: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's statistics (cumulative average) in train mode."""
    norms = batch_norms(student)
    saved = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    student.train()
    try:
        for x in batches:
            student(x)
    finally:
        for bn, m in zip(norms, saved, strict=True):
            bn.momentum = m


@torch.no_grad()
def refresh_bn_checked(student: nn.Module, batches: list[torch.Tensor],
                       targets: torch.Tensor) -> dict[str, Any]:
    """:func:`refresh_bn`, undone unless it lowers the mean KL of the eval-mode student's
    outputs on ``batches`` from ``targets`` (the float model's logits there). Returns both KLs
    (nats) and whether the refreshed statistics were kept."""
    norms = batch_norms(student)
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in norms]
    before = mean_kl(targets, _eval_logits(student, batches))
    refresh_bn(student, batches)
    after = mean_kl(targets, _eval_logits(student, batches))
    kept = after <= before
    if not kept:
        for bn, (mean, var, count) in zip(norms, saved, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
    return {"kl_before": before, "kl_after": after, "kept": kept}


@torch.no_grad()
def _eval_logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    training = model.training
    model.eval()
    try:
        return torch.cat([model(x) for x in batches])
    finally:
        model.train(training)


def set_bn_frozen(student: nn.Module, frozen: bool) -> None:
    """Train mode for everything, BatchNorm in eval mode if ``frozen``."""
    student.train()
    if frozen:
        for bn in batch_norms(student):
            bn.eval()


def parameter_groups(student: nn.Module, cfg: QATConfig) -> list[dict[str, Any]]:
    """Adam groups: each adder layer's weights and bias at ``lr`` times its mean grid step,
    its steps at ``step_lr`` times that step, the rest at ``float_lr``."""
    groups, seen = [], set()
    for m in student.modules():
        if isinstance(m, QATAdder2d):
            seen.update(id(p) for p in (m.weight, m.step, m.bias))
            mean_step = float(m.step.detach().mean())
            groups.append({"params": [m.weight, m.bias], "lr": cfg.lr * mean_step})
            groups.append({"params": [m.step], "lr": cfg.step_lr * mean_step})
    rest = [p for p in student.parameters() if id(p) not in seen and p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr": cfg.float_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def schedule(step: int, total: int, warmup: int = 0) -> float:
    """Learning-rate factor of ``step`` of ``total``: linear from ``1/warmup`` to 1 over the
    first ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def fingerprint(quantized: nn.Module) -> str:
    """A digest of the quantized model's state: a checkpoint resumes only the same start."""
    h = hashlib.sha256()
    for k, v in sorted(quantized.state_dict().items()):
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    write_torch_atomic(path, state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`qat`, checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no QAT checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a damaged file
        raise ValueError(f"{path} is not a readable QAT checkpoint ({type(e).__name__}: {e}); "
                         "delete it and start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an adderquant QAT checkpoint; delete it or give "
                         "another --state")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}; this "
                         f"adderquant reads version {CHECKPOINT_VERSION}")
    return state


# --------------------------------------------------------------------------- the run


def qat(
    model: nn.Module,
    quantized: nn.Module,
    cfg: QATConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: str,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``quantized`` by QAT with the float ``model`` as teacher; returns the trained
    quantized model (``QuantAdder2d`` layers, eval mode) and a report (configuration, one row
    per epoch, final held-out agreement and KL, seconds).

    ``images``/``labels``: the whole training set (uint8, int64); the last ``cfg.holdout`` are
    never trained on. ``checkpoint``: file written after every epoch; ``resume``: continue from
    it. The caller's random generator and the models' modes are left alone."""
    cfg.validate()
    if cfg.holdout >= len(images):
        raise ValueError(f"holdout={cfg.holdout} leaves no training images of {len(images)}")
    if resume and checkpoint is None:
        raise ValueError("resume needs a checkpoint file")
    mean, std = normalisation or NORMALISATION[dataset]
    prepare = lambda x: normalize(x, mean, std)  # noqa: E731
    n_train = len(images) - cfg.holdout
    train_images, train_labels = images[:n_train], labels[:n_train]
    per_epoch = max(1, n_train // cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    warmup = round(total * cfg.warmup)
    freeze_at = round(total * (1.0 - cfg.bn_freeze)) if cfg.bn_freeze > 0 else None
    augment = cfg.augment if cfg.augment is not None else AUGMENTATIONS.get(dataset) == "crop+flip"
    views = AugmentedViews(train_images, cfg.seed, augment)
    view_count = cfg.views if augment else 1
    training = quantized.training, model.training
    teacher = model.eval()
    start_time = time.perf_counter()

    student = to_trainable(quantized, model)
    set_true_gradient(student, cfg.true_gradient)
    opt = torch.optim.Adam(parameter_groups(student, cfg))
    source = fingerprint(quantized)
    held = images[n_train:][: cfg.eval_images]
    state: dict[str, Any] = {"epoch": 0, "step": 0, "rows": [], "teacher": {},
                             "held_reference": None, "start": {}, "bn_refresh": {}}
    if resume and Path(checkpoint).exists():
        saved = load_checkpoint(checkpoint)
        if saved["source"] != source or saved["config"] != cfg.as_dict():
            raise ValueError(f"{checkpoint} was written by a run with another starting model or "
                             "configuration; start again without --resume or use the same "
                             "settings")
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]

    outputs = _num_outputs(teacher, train_images[:1], prepare)

    def teacher_logits(view: int, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The float model's logits of the images ``idx`` in ``view`` (``x``: those images,
        prepared), computed once per image and view and kept in the state."""
        cache = state["teacher"].setdefault(view, torch.full((n_train, outputs), float("nan")))
        if torch.isnan(cache[idx, 0]).any():
            with torch.no_grad():
                cache[idx] = teacher(x)
        return cache[idx]

    def refresh(student: nn.Module, when: str) -> None:
        """Refresh the BatchNorm statistics (checked against the teacher if asked for)."""
        batches = refresh_batches(views, cfg, prepare)
        if not cfg.bn_refresh_check:
            refresh_bn(student, batches)
            return
        targets = torch.cat([teacher_logits(0, idx, x) for idx, x in
                             zip(refresh_indices(n_train, cfg), batches, strict=True)])
        outcome = refresh_bn_checked(student, batches, targets)
        state.setdefault("bn_refresh", {})[when] = outcome
        if progress:
            tqdm.write(f"BatchNorm refresh ({when}): KL on the refresh images "
                       f"{1000 * outcome['kl_before']:.2f}e-3 -> "
                       f"{1000 * outcome['kl_after']:.2f}e-3 nats, "
                       f"{'kept' if outcome['kept'] else 'undone'}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if state["held_reference"] is None and len(held):
            state["held_reference"] = batched_logits(teacher, held, prepare)
            state["start"] = held_out_scores(quantized, held, prepare, state["held_reference"])
            if progress:
                tqdm.write(f"start: held-out agreement {state['start']['agreement']:.2f} %, KL "
                           f"{1000 * state['start']['kl']:.2f}e-3 nats")
        if state["step"] == 0 and cfg.bn_refresh_batches:
            refresh(student, "start")
        for epoch in range(state["epoch"], epochs):
            view = epoch % view_count
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + 7919 * (epoch + 1)))
            set_bn_frozen(student, freeze_at is not None and state["step"] >= freeze_at)
            epoch_start = time.perf_counter()
            loss_sum = correct = seen = 0.0
            steps_here = min(per_epoch, total - state["step"])
            bar = tqdm(range(steps_here), desc=f"qat epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            for b in bar:
                if freeze_at is not None and state["step"] == freeze_at and freeze_at > 0:
                    if cfg.bn_refresh_batches:
                        refresh(student, "freeze")
                    set_bn_frozen(student, True)
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x = prepare(views.batch(view, idx))
                y = train_labels[idx]
                target = teacher_logits(view, idx, x)
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * schedule(state["step"], total, warmup)
                out = student(x)
                loss = (F.cross_entropy(out, y) if cfg.loss == "ce"
                        else distillation_loss(out, target, cfg.temperature))
                if not torch.isfinite(loss):
                    raise RuntimeError(f"QAT diverged at step {state['step']} (loss {loss}); "
                                       "lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                loss_sum += float(loss.detach()) * len(idx)
                correct += float((out.argmax(1) == y).sum())
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.1f}")
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": state["step"], "loss": loss_sum / max(seen, 1),
                "train_top1": 100.0 * correct / max(seen, 1),
                "seconds": time.perf_counter() - epoch_start,
            }
            if len(held):
                row.update(held_out_scores(to_quantized(student), held, prepare,
                                           state["held_reference"]))
            state["rows"].append(row)
            state["epoch"] = epoch + 1
            set_bn_frozen(student, freeze_at is not None and state["step"] >= freeze_at)
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "source": source, "config": cfg.as_dict(), "student": student.state_dict(),
                    "optimizer": opt.state_dict(), "state": state,
                })
            if progress:
                tqdm.write(_row_line(row))
    result = to_quantized(student)
    quantized.train(training[0])
    model.train(training[1])
    report = {"config": cfg.as_dict(), "epochs": state["rows"], "steps": state["step"],
              "changed_codes": changed_codes(quantized, result),
              "seconds": time.perf_counter() - start_time, "train_images": n_train,
              "held_out_images": len(held), "start": state["start"],
              "bn_refresh": state.get("bn_refresh", {})}
    if state["rows"] and "agreement" in state["rows"][-1]:
        report.update(agreement=state["rows"][-1]["agreement"], kl=state["rows"][-1]["kl"])
    return result, report


def changed_codes(start: nn.Module, trained: nn.Module) -> float:
    """Fraction of all adder weight codes of ``trained`` that differ from ``start``'s (the
    same network, both with ``QuantAdder2d`` layers)."""
    before = {n: m.weight_codes for n, m in start.named_modules() if isinstance(m, QuantAdder2d)}
    changed = total = 0
    for name, m in trained.named_modules():
        if isinstance(m, QuantAdder2d):
            changed += int((m.weight_codes != before[name]).sum())
            total += m.weight_codes.numel()
    return changed / max(total, 1)


def held_out_scores(qmodel: nn.Module, held: torch.Tensor, prepare: Callable,
                    reference: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (%) with the float model and mean KL (nats) on the held-out images."""
    out = batched_logits(qmodel, held, prepare)
    return {"agreement": 100.0 * float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "kl": mean_kl(reference, out)}


@torch.no_grad()
def _num_outputs(model: nn.Module, image: torch.Tensor, prepare: Callable) -> int:
    return int(model(prepare(image)).shape[1])


def _row_line(row: dict[str, Any]) -> str:
    text = (f"epoch {row['epoch']}: step {row['step']}, loss {row['loss']:.4f}, train top-1 "
            f"{row['train_top1']:.2f} %, {row['seconds']:.0f} s")
    if "kl" in row:
        text += (f"; held-out agreement {row['agreement']:.2f} %, KL "
                 f"{1000 * row['kl']:.2f}e-3 nats")
    return text
