"""Adder network architectures, the model zoo's pretrained records and checkpoint loading."""

from adderquant.models.checkpoint import CheckpointError, load_pretrained, read_state_dict
from adderquant.models.registry import (
    ADDER_MODELS,
    MODEL_NAMES,
    RECORDS,
    ModelRecord,
    create_model,
    model_record,
)

__all__ = [
    "ADDER_MODELS",
    "MODEL_NAMES",
    "RECORDS",
    "CheckpointError",
    "ModelRecord",
    "create_model",
    "load_pretrained",
    "model_record",
    "read_state_dict",
]
