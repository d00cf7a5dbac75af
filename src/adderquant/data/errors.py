"""Errors raised while locating or reading dataset files."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not where it was looked for."""


class CorruptDatasetError(ValueError):
    """A dataset file that is truncated, corrupted or not in the expected format."""
