"""Adder network architectures and checkpoint loading."""

from adderquant.models.checkpoint import CheckpointError, load_pretrained, read_state_dict
from adderquant.models.registry import MODEL_NAMES, create_model

__all__ = ["MODEL_NAMES", "CheckpointError", "create_model", "load_pretrained", "read_state_dict"]
