"""Distributed data parallel under ``torchrun`` (or any launcher setting its variables).

The launcher starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` joins PyTorch's process group
(NCCL on CUDA, gloo on the CPU) from them and leaves it at the end. Nothing here starts
processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def from_environment(environ: dict[str, str] | None = None) -> Processes:
    """The process layout the launcher's variables describe; one process when none is set."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Processes()
    missing = [v for v in LAUNCH_VARIABLES if v not in environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start a "
                           "distributed run with `torchrun --nproc-per-node N -m adderquant "
                           "train ...`, or unset WORLD_SIZE")
    try:
        rank, world, local = (int(environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as e:
        raise RuntimeError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise RuntimeError(f"bad process layout: RANK={rank}, WORLD_SIZE={world}, "
                           f"LOCAL_RANK={local}")
    return Processes(rank, world, local)


def pick_device(processes: Processes, requested: str = "auto") -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is there (or asked for), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu")
    if processes.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {processes.local_rank} but only "
                           f"{torch.cuda.device_count()} CUDA devices; start at most that many "
                           "processes per node")
    return torch.device("cuda", processes.local_rank)


@contextmanager
def process_group(processes: Processes, device: torch.device) -> Iterator[None]:
    """Join the process group of a distributed run (nothing for one process), leave it after."""
    if not processes.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=processes.rank,
                            world_size=processes.world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_sum(values: Sequence[float], processes: Processes, device: torch.device) -> list[float]:
    """Each value summed over the processes (float64)."""
    if not processes.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
