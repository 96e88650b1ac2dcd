"""Does channels-last or bfloat16 autocast speed up gated training on CPU, and does it cost accuracy?

Speed: training steps (forward, gatekit loss, backward, SGD step) of a gated ResNet20 (DLCG) at batch
``--batch-size`` on CIFAR-10-shaped inputs, four variants (float32 / channels-last / bf16 autocast /
both) interleaved in rotating order; medians of within-repeat ratios to float32.

Accuracy (``--accuracy``): ``examples/train.py`` finetunes the same dense checkpoint with and without
each option and reports val accuracy, so a speedup is only taken if it keeps accuracy.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch
from torch import nn

import gatekit
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"float32": (False, False), "channels_last": (True, False), "bf16": (False, True), "channels_last+bf16": (True, True)}


def step_function(channels_last: bool, bf16: bool, batch_size: int):
    gated = gatekit.convert(get_model("cifar/resnet20"), regularizer=gatekit.SparsityLoss(layer=0.005, channel=0.005))
    gated.train()
    optimizer = torch.optim.SGD(gatekit.param_groups(gated, weight_decay=5e-4), lr=0.05, momentum=0.9, nesterov=True)
    images, labels = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    if channels_last:
        gated = gated.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(gated(images).float(), labels)
        loss = loss + gatekit.gate_loss(gated)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def measure_speed(batch_size: int, repeats: int) -> dict:
    steps = {name: step_function(*flags, batch_size) for name, flags in VARIANTS.items()}
    for step in steps.values():
        step()  # warmup
    seconds = time_interleaved(steps, repeats)
    return {name: dict(median_step_seconds=statistics.median(times),
                       speedup_vs_float32=paired_ratio(seconds["float32"], times))
            for name, times in seconds.items()}


def measure_accuracy(init: Path, epochs: int, train_images: int, out: Path, variants: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train

    results = {}
    for name in variants:
        channels_last, bf16 = VARIANTS[name]
        argv = ["--dataset", "fashion-mnist", "--method", "dlcg", "--layer", "0.002", "--channel", "0.002",
                "--init", str(init), "--epochs", str(epochs), "--train-images", str(train_images),
                "--out", str(out / name), "--threads", str(torch.get_num_threads())]
        argv += ["--channels-last"] * channels_last + ["--bf16"] * bf16
        summary = train.main(argv)
        results[name] = dict(val_accuracy=summary["val_accuracy"], val_mean_macs=summary["val_mean_macs"],
                             seconds_last_epoch=summary["final"]["seconds"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--accuracy", type=Path, metavar="DENSE_CHECKPOINT",
                        help="also finetune this dense Fashion-MNIST checkpoint with each variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to finetune with --accuracy")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=10240)
    parser.add_argument("--output", type=Path, default=RESULTS / f"train_speed_{datetime.date.today().isoformat()}.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = dict(command=" ".join(sys.argv), torch=torch.__version__, threads=args.threads,
                  batch_size=args.batch_size, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  load_average=os.getloadavg())
    if not args.skip_speed:
        report["speed"] = measure_speed(args.batch_size, args.repeats)
        print(json.dumps(report["speed"], indent=1), flush=True)
    if args.accuracy:
        report["accuracy"] = measure_accuracy(args.accuracy, args.epochs, args.train_images, Path("runs/train_speed"),
                                              args.variants)
        print(json.dumps(report["accuracy"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
