"""Loading released AdderNet checkpoints."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict on the CPU with ``weights_only=True``, unwrapping ``state_dict`` and
    stripping a ``module.`` (DataParallel) prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}; pass --checkpoint PATH or set $ADDERQUANT_MODELS"
        )
    obj = load_tensors_only(path, "checkpoint")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    problems = tensors_with_bad_numbers(state)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} holds values that make the outputs meaningless: "
            f"{problems}; use a checkpoint saved before its training diverged"
        )
    return state


def tensors_with_bad_numbers(state: Mapping[str, torch.Tensor], shown: int = 5) -> str:
    """The floating tensors of ``state`` holding NaN or inf, and BatchNorm variances below zero
    (NaN after the square root), as ``name (count of size NaN/inf)``; empty when none."""
    found = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            found.append(f"{name} ({bad} of {t.numel()} values NaN/inf)")
        elif name.endswith("running_var") and bool((t < 0).any()):
            found.append(f"{name} ({int((t < 0).sum())} negative variances)")
    more = f" and {len(found) - shown} more tensors" if len(found) > shown else ""
    return ", ".join(found[:shown]) + more


def load_tensors_only(path: Path, what: str) -> object:
    """``torch.load`` of ``path`` on the CPU that unpickles tensors and plain containers only;
    a file holding other Python objects (which could run code) or a damaged file raises
    :class:`CheckpointError` naming ``what`` and ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        found = next((line for line in lines if "GLOBAL" in line), None)
        if found is None:  # not an object the safe unpickler refused: a damaged file
            detail = next((line for line in lines if line.startswith("Unsupported")), "")
            raise CheckpointError(f"cannot read {what} {path}: {detail or 'not a pickle'} (a "
                                  "truncated or non-PyTorch file?)") from None
        raise CheckpointError(
            f"refusing to load {what} {path}: besides tensors it holds Python objects, whose "
            f"loading could run code ({found}); use a file of tensors saved by adderquant or "
            "torch.save(model.state_dict())") from None
    except Exception as e:  # malformed files fail in many ways (zip, pickle, struct, key...)
        first_line = next(iter(str(e).splitlines()), "")
        raise CheckpointError(
            f"cannot read {what} {path}: {e.__class__.__name__}: {first_line} "
            "(a truncated or non-PyTorch file?)"
        ) from None


def state_mismatch(own: dict, state: dict, source: str = "file") -> list[str]:
    """Lines describing how ``state`` (from ``source``) fails to fit a model whose state dict is
    ``own``: missing keys (BatchNorm batch counters excepted), unexpected keys and shape
    mismatches, each list cut short; empty if it fits."""
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and isinstance(own[k], torch.Tensor)
        and state[k].shape != own[k].shape
    ]
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
    return lines


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a released checkpoint into ``model``; any missing (except BatchNorm batch counters),
    unexpected or mis-shaped key is an error that lists them."""
    state = read_state_dict(path)
    own = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm batch counters; they only matter
    # for momentum=None training, so the model's own (zero) counters stand in for them.
    problems = state_mismatch(own, state, "checkpoint")
    if problems:
        raise CheckpointError("\n".join(
            [f"checkpoint {path} does not fit {model.__class__.__name__}:", *problems,
             "  is --model the architecture this checkpoint was trained with?"]))
    model.load_state_dict({**own, **state})
    return model
