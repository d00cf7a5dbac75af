"""A restricted unpickler for dataset files: numpy arrays and plain containers only."""

from __future__ import annotations

import io
import pickle
from typing import Any

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references something other than arrays and plain containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: dataset pickles may only hold numpy arrays, "
            "lists, dicts, strings and numbers (is this file really a CIFAR batch?)"
        )


def safe_load(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` (a dataset file's bytes) without executing arbitrary objects."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated / corrupted pickles raise many kinds of error
        raise pickle.UnpicklingError(
            f"{source}: corrupted or truncated pickle ({e.__class__.__name__}: {e}); "
            "re-download the dataset (adderquant data fetch)"
        ) from e
