"""Distributed data parallel: two gloo processes on 127.0.0.1 take the same steps as one
process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Trains a small adder model (no BatchNorm, whose statistics are per process) for 2 epochs of 4
# steps each, with momentum, weight decay, the adaptive gradient scaling and the cosine
# schedule; process 0 saves the final weights to argv[1].
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from adderquant.data.splits import MemorySplit, TrainingData
    from adderquant.nn import Adder2d
    from adderquant.train import (RunIdentity, TrainConfig, fit, from_environment,
                                  process_group)

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=gen)
    split = MemorySplit(images, labels)
    data = TrainingData(split, MemorySplit(images[:20], labels[:20]), None, 10, "test")
    torch.manual_seed(0)
    model = nn.Sequential(Adder2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False, seed=5)
    processes = from_environment()
    with process_group(processes, torch.device("cpu")):
        result = fit(model, data, cfg, RunIdentity("tiny", "random", 10), ((0.5,), (0.25,)),
                     processes=processes)
    if processes.main:
        torch.save({"weights": model.state_dict(), "history": result.history}, sys.argv[1])
""")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, out: Path, rank: int | None, world: int, port: int):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [launch(script, tmp_path / "ddp.pt", rank, 2, port) for rank in (0, 1)]
    procs.append(launch(script, tmp_path / "single.pt", None, 1, port))
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the training processes did not finish within {TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    for key, value in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][key], value, rtol=0, atol=1e-5)
    moved = single["weights"]["0.adder"] - _initial_adder_weight()
    assert moved.abs().max() > 1e-2
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_top1"] == b["val_top1"]


def _initial_adder_weight() -> torch.Tensor:
    from adderquant.nn import Adder2d

    torch.manual_seed(0)
    return Adder2d(1, 4, 3, padding=1).adder.detach()
