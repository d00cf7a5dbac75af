"""The training loop: SGD with the cosine schedule, the adder layers' adaptive gradient scaling
applied to the averaged gradient, validation after every epoch, ``last`` / ``best``
checkpoints, resume, and distributed data parallel when the run has several processes.

The adaptive scaling ``grad_w *= eta * sqrt(numel) / ||grad_w||`` is not linear, so it must see
the gradient of the whole global batch: the loop switches the layers' own scaling off and
applies it after the backward pass, once ``DistributedDataParallel`` has averaged the gradients.
One process with a batch of ``B`` and ``k`` processes with ``B / k`` each then take the same
steps (up to float rounding), BatchNorm aside: each process normalises with the statistics of
its own share unless ``sync_bn`` is set.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adderquant._io import write_bytes_atomic
from adderquant.data.splits import Split, TrainingData
from adderquant.data.transforms import normalize
from adderquant.nn import Adder2d
from adderquant.ops.gradients import rescale_
from adderquant.train.distributed import Processes, all_sum
from adderquant.train.history import write_log, write_plot
from adderquant.train.recipe import CosineFactor, TrainConfig
from adderquant.train.state import RunIdentity, checkpoint_bytes, read_checkpoint, set_rng_states

# Settings a resumed run may change: they do not change the numbers computed.
RESUME_MAY_CHANGE = ("workers",)
SINGLE_PROCESS = Processes()
CPU = torch.device("cpu")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the model's weights are no longer usable."""


@dataclass(frozen=True)
class RunFolder:
    """The files of a run: checkpoints, the final weights, the log and the plot."""

    path: Path

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def weights(self) -> Path:
        return self.path / "model.pth"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def plot(self) -> Path:
        return self.path / "curves.png"

    FILES = ("last.pt", "best.pt", "model.pth", "log.jsonl", "curves.png")


@dataclass
class FitResult:
    """Per-epoch rows, the best validation epoch, whether every epoch has run, and the test
    split's figures when validation ran on a held-out part of the training set."""

    history: list[dict]
    best: dict | None
    finished: bool
    test: dict | None = None
    images_per_second: float = field(default=0.0)


@contextmanager
def deferred_gradient_scaling(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Switch off the adder layers' own gradient scaling; yields their weights, whose gradients
    the caller scales. Restores the layers' settings on exit."""
    layers = [m for m in model.modules() if isinstance(m, Adder2d)]
    saved = [m.eta for m in layers]
    for m in layers:
        m.eta = None
    try:
        yield [m.adder for m in layers]
    finally:
        for m, eta in zip(layers, saved, strict=True):
            m.eta = eta


def steps_per_epoch(examples: int, batch_per_process: int, world: int) -> int:
    """Optimizer steps of one epoch (each process takes ``ceil(examples / world)`` of them)."""
    per_process = -(-examples // world)
    return -(-per_process // batch_per_process)


def _broadcast_buffers(model: nn.Module, processes: Processes) -> None:
    """BatchNorm statistics of process 0 everywhere (each process updated its own copy)."""
    if processes.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, batch_size: int, normalisation,
                   processes: Processes, device: torch.device, workers: int = 0) -> dict:
    """Loss, top-1 and top-5 (%) of ``model`` over ``split``, each process scoring its shard."""
    model.eval()
    loss = top1 = top5 = seen = 0.0
    for x, y in split.eval_batches(batch_size, processes.rank, processes.world, workers):
        x, y = normalize(x, *normalisation).to(device), y.to(device)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y.view(-1, 1)).any(dim=1).sum())
        seen += len(y)
    loss, top1, top5, seen = all_sum([loss, top1, top5, seen], processes, device)
    return {"loss": loss / seen, "top1": 100 * top1 / seen, "top5": 100 * top5 / seen,
            "images": int(seen)}


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now = cfg.as_dict()
    differ = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if differ:
        changes = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"{path} was trained with other settings ({changes}); a resumed run "
                         "keeps its settings: drop those flags, or start a new run")


def fit(
    model: nn.Module,
    data: TrainingData,
    cfg: TrainConfig,
    identity: RunIdentity,
    normalisation: tuple[Sequence[float], Sequence[float]],
    *,
    folder: RunFolder | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
    processes: Processes = SINGLE_PROCESS,
    device: torch.device = CPU,
    progress: bool = False,
    report: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` in place with ``cfg``; returns its history.

    Process 0 alone writes ``folder`` (if given) after each epoch: ``last.pt``, ``best.pt``
    (highest validation top-1), ``log.jsonl`` and ``curves.png``, and ``model.pth`` (the final
    state dict) at the end. ``resume`` continues from a checkpoint of the same run;
    ``stop_after`` ends this call after that many finished epochs (resume later). Run under
    :func:`adderquant.train.distributed.process_group` when there are several processes;
    ``report`` receives each epoch's row on process 0.
    """
    if cfg.batch_size % processes.world:
        raise ValueError(f"the batch size {cfg.batch_size} is not divisible by the "
                         f"{processes.world} processes; choose a multiple of {processes.world}")
    batch = cfg.batch_size // processes.world
    steps = steps_per_epoch(len(data.train), batch, processes.world)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineFactor(cfg.epochs * steps, cfg.warmup_epochs * steps))
    history: list[dict] = []
    best: dict | None = None
    start = 0
    if resume is not None:
        state = read_checkpoint(resume, identity)
        _check_resumable(state["config"], cfg, resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_states(state["rng"])
        history, best, start = state["history"], state["best"], state["epoch"]
    net: nn.Module = model
    if cfg.sync_bn and processes.distributed:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs "
                             "only); drop --sync-bn on the CPU")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if processes.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    module = net.module if processes.distributed else net
    write = folder is not None and processes.main
    end = cfg.epochs if stop_after is None else min(cfg.epochs, max(stop_after, start))
    with deferred_gradient_scaling(module) as adder_weights:
        for epoch in range(start, end):
            net.train()
            began = time.perf_counter()
            loss_sum = correct = seen = 0.0
            lr = optimizer.param_groups[0]["lr"]
            batches = data.train.batches(batch, epoch, cfg.seed, processes.rank, processes.world,
                                         cfg.augment, cfg.workers)
            bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (progress and processes.main), leave=False)
            for x, y in bar:
                x, y = normalize(x, *normalisation).to(device), y.to(device)
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = float(loss.detach())
                bad = all_sum([0.0 if torch.isfinite(loss) else 1.0], processes, device)[0]
                if bad:
                    raise TrainingDiverged(
                        f"training diverged: the loss became {value} in epoch {epoch + 1} "
                        f"(learning rate {optimizer.param_groups[0]['lr']:.4g}); lower --lr")
                if cfg.eta is not None:
                    for w in adder_weights:
                        if w.grad is not None:
                            rescale_(w.grad, cfg.eta)
                optimizer.step()
                schedule.step()
                loss_sum += value * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                if processes.main:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
            loss_sum, correct, seen = all_sum([loss_sum, correct, seen], processes, device)
            seconds = time.perf_counter() - began
            _broadcast_buffers(module, processes)
            val = evaluate_split(module, data.val, batch, normalisation, processes, device,
                                 cfg.workers)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
                   "train_top1": 100 * correct / seen, "val_loss": val["loss"],
                   "val_top1": val["top1"], "val_top5": val["top5"],
                   "seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 1)}
            history.append(row)
            if best is None or row["val_top1"] > best["val_top1"]:
                best = {"epoch": row["epoch"], "val_top1": row["val_top1"]}
            if write:
                blob = checkpoint_bytes(identity, cfg.as_dict(), epoch + 1, module, optimizer,
                                        schedule, history, best)
                write_bytes_atomic(folder.last, blob)
                if best["epoch"] == row["epoch"]:
                    write_bytes_atomic(folder.best, blob)
                write_log(folder.log, history)
                write_plot(folder.plot, history, f"{identity.model} on {identity.dataset}")
            if report is not None and processes.main:
                report(row)
    finished = end == cfg.epochs
    result = FitResult(history, best, finished)
    if history:
        result.images_per_second = sum(r["images_per_s"] * r["seconds"] for r in history) / sum(
            r["seconds"] for r in history)
    if finished and data.test is not None:
        result.test = evaluate_split(module, data.test, batch, normalisation, processes, device,
                                     cfg.workers)
    if finished and write:
        write_bytes_atomic(folder.weights, _state_dict_bytes(module))
    return result


def _state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()
