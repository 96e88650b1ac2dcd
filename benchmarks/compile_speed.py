"""What does torch.compile do for a gated model? Training steps and inference, eager vs compiled.

Times, side by side and interleaved within each repeat, on ResNet20 (3x32x32):

- ``train``: one SGD step (forward, cross-entropy + ``gatekit.gate_loss``, backward, step) of the
  gated model in training mode (masked: Gumbel-sampled 0/1 gates multiply every branch);
- ``masked``: the gated model in eval mode;
- ``sparse``: ``gatekit.sparse(gated)``;
- ``dense``: the original model, as the reference the others are read against;

each in eager mode and under ``torch.compile`` (default backend, inductor), and reports the
compiled/eager latency ratio (median of the ratios within each repeat; below 1 is faster) and the
time of the first compiled call (compilation included).

Eval-mode gates are forced to one pattern for every sample: each block keeps the first half of its
filters, and the last block of each stage is skipped; the MAC fraction this gives is reported. Training
uses the fresh gates (open with probability sigmoid(3) = 0.95 under the noise).

Usage (from the repository root)::

    python benchmarks/compile_speed.py                 # 16 minutes on 2 busy CPU cores, mostly compiling
    python benchmarks/compile_speed.py --quick         # batch 8, 3 repeats; the compiles still take minutes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

# See benchmarks/sparse_speed.py: spinning OpenMP threads on a shared machine distort latencies.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import gatekit
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model

RESULTS = Path(__file__).parent / "results"
LOGIT = 50.0


def force_gates(gated: nn.Module) -> float:
    """Keep the first half of every block's filters; skip each stage's last block. Returns the MAC fraction."""
    sites = gated.gatekit.sites
    last_of_stage = {site.name.rsplit(".", 1)[0]: site.name for site in sites}
    for site in sites:
        gate = gatekit.gates_of(gated)[site.name]
        nn.init.zeros_(gate.channel_head.weight)
        gate.channel_head.bias.data = torch.tensor([LOGIT if c < site.channels // 2 else -LOGIT
                                                    for c in range(site.channels)])
        nn.init.zeros_(gate.layer_head.weight)
        gate.layer_head.bias.data.fill_(-LOGIT if site.name in last_of_stage.values() else LOGIT)
    gated.eval()
    with torch.no_grad():
        gated(torch.randn(2, *gated.gatekit.input_shape[1:]))
    return gatekit.dynamic_macs(gated).float().mean().item() / gated.gatekit.dense_macs


def train_step(model: nn.Module, gated: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels) + gatekit.gate_loss(gated)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def inference(model: Callable, images: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            model(images)
    return call


def first_call_seconds(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(batch: int, repeats: int, iterations: int) -> dict:
    torch.manual_seed(0)
    dense = get_model("cifar/resnet20").eval()
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    row: dict = {"batch": batch}

    # Training: eager and compiled copies with the same weights and their own optimizers.
    trainers, compile_seconds = {}, {}
    for mode in ("eager", "compiled"):
        gated = gatekit.convert(dense, regularizer=gatekit.SparsityLoss(layer=0.002, channel=0.002)).train()
        model = torch.compile(gated) if mode == "compiled" else gated
        optimizer = torch.optim.SGD(gatekit.param_groups(gated), lr=0.01, momentum=0.9)
        trainers[mode] = train_step(model, gated, optimizer, images, labels)
        compile_seconds[f"train_{mode}"] = first_call_seconds(trainers[mode])

    gated = gatekit.convert(dense)
    row["mac_fraction"] = force_gates(gated)
    fast = gatekit.sparse(gated)
    calls = {"train_eager": trainers["eager"], "train_compiled": trainers["compiled"]}
    for name, model in (("dense", dense), ("masked", gated), ("sparse", fast)):
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)  # also compiles
        calls[f"{name}_eager"], calls[f"{name}_compiled"] = inference(model, images), inference(compiled, images)
        compile_seconds[f"{name}_compiled"] = first_call_seconds(calls[f"{name}_compiled"])
    for call in calls.values():  # warm up every variant once more before timing
        call()
    times = time_interleaved(calls, repeats, iterations, rotate=False)
    row["median_ms"] = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
    row["compiled_over_eager"] = {
        name: round(paired_ratio(times[f"{name}_compiled"], times[f"{name}_eager"]), 3)
        for name in ("train", "dense", "masked", "sparse")
    }
    row["over_dense_eager"] = {
        name: round(paired_ratio(times[name], times["dense_eager"]), 3)
        for name in times if not name.startswith(("train", "dense_eager"))
    }
    row["first_call_seconds"] = {name: round(s, 2) for name, s in compile_seconds.items()}
    return row


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, gatekit=metadata.version("gatekit"), host=platform.node(),
                omp_wait_policy=os.environ["OMP_WAIT_POLICY"], load_average=os.getloadavg())


def _git_revision() -> str:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "gatekit"], capture_output=True, text=True).stdout
        return revision + ("+uncommitted gatekit changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 only, fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/compile_speed_<date>.json)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    batches = [8] if arguments.quick else [int(b) for b in arguments.batches.split(",")]
    repeats = 3 if arguments.quick else arguments.repeats
    started = time.time()
    rows = []
    for batch in batches:
        iterations = max(2, 64 // batch)
        rows.append(measure(batch, repeats, iterations))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(
        date=datetime.date.today().isoformat(), command=" ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        revision=_git_revision(), machine=machine(), repeats=repeats, seconds=round(time.time() - started), rows=rows,
    )
    output = arguments.output or RESULTS / f"compile_speed_{result['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
