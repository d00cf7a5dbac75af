"""A restricted unpickler for dataset files: numpy arrays and plain containers only."""

from __future__ import annotations

import io
import pickle
from typing import Any

from adderquant.data.errors import CorruptDatasetError

# Every global a pickle of numpy arrays, numbers, strings, lists, dicts and sets may name, for
# protocols 0-5, Python 2 writers (``__builtin__``) and numpy 1.x (``numpy.core``) and 2.x
# (``numpy._core``) writers.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    *((module, name) for module in ("builtins", "__builtin__")
      for name in ("bytearray", "set", "frozenset")),
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that references something other than arrays and plain containers."""


class CorruptPickleError(CorruptDatasetError, pickle.UnpicklingError):
    """A pickle that is truncated or otherwise unreadable."""


class _RestrictedUnpickler(pickle.Unpickler):
    source = "<bytes>"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refusing to load {module}.{name}: dataset pickles may only hold "
            "numpy arrays, lists, dicts, strings and numbers (is this file really a dataset "
            "batch? only load pickles from a source you trust)"
        )


def safe_load(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` (a dataset file's bytes) without executing arbitrary objects.

    Raises ``UnsafePickleError`` for a pickle naming any other global (nothing is called) and
    ``CorruptPickleError`` for a truncated or corrupted one; ``source`` names the file in both.
    """
    unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1")
    unpickler.source = source
    try:
        return unpickler.load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated / corrupted pickles raise many kinds of error
        raise CorruptPickleError(
            f"{source}: corrupted or truncated pickle ({e.__class__.__name__}: {e}); "
            "re-download the dataset (adderquant data fetch)"
        ) from e
