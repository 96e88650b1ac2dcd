"""The paper's own CIFAR-10 schedule, for a lent GPU: every run of Table 1 at once, from scratch.

ResNet20 trained jointly with its gates for 400 epochs (batch 256, learning rate 0.1 divided by 10 at
epochs 200, 300 and 375, Nesterov momentum, weight decay 5e-4 off the gates: ``train.py --recipe
paper``), at each (λ, γ) of Table 1, next to channel gating alone, ConvNet-AIG and the dense ResNet20,
ResNet14 and ResNet8 on the same schedule. All runs start together, one process each, sharing the GPU;
``train.py`` holds the training split on the device, so no loader stands between them and the GPU.
A run whose ``model.pt`` exists is skipped, so a second call resumes (each run also resumes from its
``last.pt``). Try it on the CPU first, on a few batches::

    python experiments/paper_schedule.py --out runs/paper-smoke --epochs 1 -- --train-images 512 --no-val --device cpu
    python experiments/paper_schedule.py --out runs/paper -- --device cuda --no-val   # on the GPU
    python experiments/report.py runs/paper --results results/cifar10-paper --datasets cifar10
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
# Table 1 of the paper: (layer λ, channel γ) for DLCG on CIFAR-10 ResNet20.
TABLE_1 = ((0.09, 0.15), (0.07, 0.12), (0.09, 0.10), (0.05, 0.10), (0.05, 0.07), (0.02, 0.03), (0.00, 0.03),
           (0.00, 0.05), (0.00, 0.00))


def plan(epochs: int) -> list[tuple[str, list[str]]]:
    """(run name, train.py arguments) of every run."""
    common = ["--dataset", "cifar10", "--recipe", "paper", "--epochs", str(epochs)]
    runs = [(f"dense-resnet{depth}", [*common, "--method", "dense", "--model", f"cifar/resnet{depth}"])
            for depth in (20, 14, 8)]
    runs += [(f"dlcg-l{layer}-c{channel}", [*common, "--method", "dlcg", "--layer", str(layer), "--channel", str(channel)])
             for layer, channel in TABLE_1]
    runs += [(f"channel-c{channel}", [*common, "--method", "channel", "--channel", str(channel)]) for channel in (0.03, 0.1)]
    runs += [(f"aig-t{target}", [*common, "--method", "layer", "--target", str(target)]) for target in (0.4, 0.6)]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--only", nargs="*", help="run names (default: all)")
    parser.add_argument("train_arguments", nargs=argparse.REMAINDER, help="after --: passed to every train.py run")
    args = parser.parse_args()
    extra = [a for a in args.train_arguments if a != "--"]
    folder = args.out / "cifar10"
    processes = []
    for name, arguments in plan(args.epochs):
        run = folder / name
        if args.only and name not in args.only or (run / "model.pt").exists():
            continue
        run.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(TRAIN), *arguments, *extra, "--out", str(run)]
        (run / "command.txt").write_text(" ".join(command[1:]) + "\n")
        processes.append((name, subprocess.Popen(command, stdout=open(run / "train.log", "a"), stderr=subprocess.STDOUT)))
    failed = [name for name, process in processes if process.wait() != 0]
    print(f"{len(processes) - len(failed)} runs finished" + (f"; failed: {failed} (see their train.log)" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
