"""Times the original project's supervised PyTorch training step, for comparison with ours.

One step is what the original's `supervised_training` loop does per batch: zero the gradients,
forward, cross-entropy on the 5-way logits, backward, and torch.optim.Adam(lr 1e-3, betas
(0.9, 0.999), eps 1e-9, weight_decay 1e-4). Metric bookkeeping that the original also does per
batch is left out: it is not part of the step we compare against.

Run from the repository root with the separate torch venv (see README.md beside this file):

  .venv-torch/bin/python -m benchmarks.torch_reference.train_step --model all

Prints one JSON line per model to stdout, e.g.
  {"model": "usleep", "mode": "supervised", "framework": "torch", "batch": 32, "threads": 2,
   "params": 3114391, "windows_per_s": ..., "steps": 20, "seconds": ..., "host": "...", ...}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time

import torch
from torch import nn

if not __package__:
    # Run as a plain script (python benchmarks/torch_reference/x.py): make the repository root
    # importable so the package import below resolves the same way as with `python -m`.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

from benchmarks.torch_reference.models import build, count_parameters
from benchmarks import machine

NUM_CLASSES = 5
CHANNELS = 3
EPOCH_SAMPLES = 6000  # 30 s at 200 Hz


def time_train_step(name: str, *, batch: int, steps: int, warmup: int,
                    seed: int = 0, device: str = "cpu") -> dict:
    """Builds `name`, runs `warmup` untimed then `steps` timed training steps on one fixed batch.

    The batch is x (batch, 3, 6000) float32 standard normal and labels (batch,) in 0..4, made
    once up front so that only the step itself is timed. Returns the JSON record (see module doc).
    On "cuda" the model and batch live on the GPU; the step's ``loss.item()`` waits for it, so
    each step's time is the GPU's, with PyTorch's default settings (cuDNN's own algorithm choice,
    its default TF32 convolutions, no benchmark mode).
    """
    torch.manual_seed(seed)
    model = build(name).to(device)
    model.train()  # dropout and BatchNorm batch statistics on, as in training
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-9,
                                 weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, EPOCH_SAMPLES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    x, labels = x.to(device), labels.to(device)

    def step() -> float:
        optimizer.zero_grad()
        logits, _ = model(x)
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        return loss.item()  # forces the step to finish, as the original's logging does

    for _ in range(warmup):
        step()
    load_before = machine.load_average()
    step_seconds = []
    losses = []
    cpu_start = time.process_time()
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        step_seconds.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{name}: non-finite loss during the benchmark: {losses}")
    return {
        "model": name,
        "mode": "supervised",
        "framework": "torch",
        "batch": batch,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "params": count_parameters(model),
        "windows_per_s": round(batch * steps / seconds, 2),
        "steps": steps,
        "seconds": round(seconds, 3),
        "host": socket.gethostname(),
        # Context for reading the number on a shared machine.
        "median_step_s": round(statistics.median(step_seconds), 4),
        # CPU time of this process over the timed steps (all its threads, spin-waits included):
        # with threads=1 on a loaded machine, batch * steps / cpu_s approximates the idle rate.
        "cpu_s": round(cpu_seconds, 3),
        "min_step_s": round(min(step_seconds), 4),
        "warmup": warmup,
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": f"{machine.cpu_name()} x{os.cpu_count()}",
        "load_1min_before": load_before,
        "load_1min_after": machine.load_average(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("usleep", "cmt", "all"), default="all")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads; 0 keeps torch's default for this machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda" (the first GPU)')
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1 and --warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = ("usleep", "cmt") if args.model == "all" else (args.model,)
    for name in names:
        record = time_train_step(name, batch=args.batch, steps=args.steps,
                                 warmup=args.warmup, seed=args.seed, device=args.device)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
