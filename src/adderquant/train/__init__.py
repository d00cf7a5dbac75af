"""Training AdderNets: the paper's recipe per dataset, resumable runs, DDP under torchrun."""

from adderquant.train.distributed import Processes, from_environment, pick_device, process_group
from adderquant.train.loop import FitResult, RunFolder, TrainingDiverged, fit
from adderquant.train.recipe import (
    RECIPES,
    TrainConfig,
    build_config,
    cosine_lr,
    read_config_file,
    recipe,
)
from adderquant.train.state import RunIdentity, read_checkpoint

__all__ = [
    "RECIPES",
    "FitResult",
    "Processes",
    "RunFolder",
    "RunIdentity",
    "TrainConfig",
    "TrainingDiverged",
    "build_config",
    "cosine_lr",
    "fit",
    "from_environment",
    "pick_device",
    "process_group",
    "read_checkpoint",
    "read_config_file",
    "recipe",
]
