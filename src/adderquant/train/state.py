"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer and schedule states, the random-number generator
states, the number of finished epochs, the run's settings and identity (model, dataset,
classes) and its history. It is written atomically (temporary file, then rename) and read back
with ``torch.load(weights_only=True)``, which builds no arbitrary objects.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "adderquant-training-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed: the zoo model, the dataset, the classes."""

    model: str
    dataset: str
    num_classes: int | None  # None: not known yet, not compared


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_bytes(identity: RunIdentity, config: dict, epoch: int, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, schedule, history: list[dict],
                     best: dict | None) -> bytes:
    """A checkpoint after ``epoch`` finished epochs, serialised."""
    state = {
        "format": FORMAT, "version": VERSION,
        "model_name": identity.model, "dataset": identity.dataset,
        "num_classes": identity.num_classes, "config": config, "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "rng": rng_states(), "history": history, "best": best,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_checkpoint(path: str | os.PathLike, identity: RunIdentity) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking it belongs to a run of ``identity``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {path}; start the run without "
                                "--resume, or give the checkpoint's path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable training checkpoint ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adderquant training checkpoint (a model's state "
                         "dict cannot be resumed: it has no optimizer or schedule state)")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')}, this adderquant "
                         f"reads version {VERSION}")
    found = RunIdentity(state["model_name"], state["dataset"], state["num_classes"])
    if (found.model, found.dataset) != (identity.model, identity.dataset) or (
            identity.num_classes not in (None, found.num_classes)):
        raise ValueError(
            f"{path} is a checkpoint of {found.model} on {found.dataset} ({found.num_classes} "
            f"classes), not of {identity.model} on {identity.dataset} ({identity.num_classes} "
            f"classes); resume with --model {found.model} --dataset {found.dataset}, or start "
            "a new run in another folder")
    return state
