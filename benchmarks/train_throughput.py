"""Training throughput: adder ResNet-20 against the convolutional ResNet-20 of the same widths.

One training step is a forward pass, the cross-entropy loss, the backward pass (AdderNet's
gradients and adaptive scaling for the adder model), and an SGD step with momentum and weight
decay, as ``adderquant train`` takes it. Both models train in this one process on the same
random CIFAR-sized batches, with the same batch size and threads; the steps of the two models
alternate so that a burst of other work on the machine slows both alike, and each figure is the
fastest of ``--reps`` rounds of ``--steps`` steps. ``--json`` prints one object with the images
per second of both and ``train_adder_vs_cnn``, the adder model's throughput over the CNN's
(target: at least 0.7).

    python benchmarks/train_throughput.py                 # batch 128, 2 threads
    python benchmarks/train_throughput.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from adderquant.models import create_model


class Trainer:
    """One model with its optimizer; :meth:`step` takes one training step."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.model = create_model(name).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=5e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # adder layers: AdderNet's gradients, scaled with eta = 0.2
        self.optimizer.step()


def timed(trainer: Trainer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for x, y in batches:
        trainer.step(x, y)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (fastest kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (args.batch_size,), generator=gen))
               for _ in range(args.steps)]
    trainers = {"adder": Trainer("resnet20"), "cnn": Trainer("resnet20-cnn")}
    for trainer in trainers.values():  # warm-up
        trainer.step(*batches[0])
    best = dict.fromkeys(trainers, float("inf"))
    for _ in range(args.reps):
        for name, trainer in trainers.items():
            best[name] = min(best[name], timed(trainer, batches))
    images = args.batch_size * args.steps
    rate = {name: images / seconds for name, seconds in best.items()}
    result = {
        "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps,
        "reps": args.reps,
        "adder_resnet20_images_per_s": round(rate["adder"], 1),
        "cnn_resnet20_images_per_s": round(rate["cnn"], 1),
        "train_adder_vs_cnn": round(rate["adder"] / rate["cnn"], 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"training step, batch {args.batch_size}, {args.threads} threads (fastest of "
          f"{args.reps} rounds of {args.steps} steps)")
    for name in ("adder", "cnn"):
        print(f"  {name:5s} ResNet-20: {rate[name]:8.1f} images/s")
    print(f"  adder / CNN throughput: {result['train_adder_vs_cnn']:.3f} (target >= 0.7)")


if __name__ == "__main__":
    main()
