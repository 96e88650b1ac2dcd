"""Issue 13's CIFAR-10 sweep: every compared model starts from the one trained ResNet20 and gets the
same finetuning (``examples/train.py --recipe finetune``, 3 epochs, distillation where it applies).

Runs go one after another into ``OUT/cifar10/<name>`` (what ``experiments/report.py`` reads); a run
whose ``model.pt`` exists is skipped, so the sweep resumes, possibly on another machine, from the
checkpoints published under ``results/cifar10/runs/`` (``--resume-from results/cifar10/runs``). The dense ResNet14 and
ResNet8 are trained from scratch with the ResNet20's recipe for its 20 epochs plus the 3 of finetuning::

    python experiments/recipe_sweep.py --out runs/c10 -- --threads 2 --channels-last
    python experiments/report.py runs/c10 --results results --datasets cifar10 --copy-checkpoints
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
DENSE = ROOT.parent / "shared" / "models" / "cifar10_resnet20_dense.pt"
LEVELS_FIRST = (0.65, 0.5, 0.25, 0.8)  # ResNet14's MACs (65 %) first: the headline comparison


def plan(epochs: int) -> list[tuple[str, list[str]]]:
    """(run name, train.py arguments). Order: what the main claims need first."""
    finetune = ["--init", str(DENSE), "--recipe", "finetune", "--epochs", str(epochs)]
    dense = ["--recipe", "paper", "--epochs", str(20 + epochs), "--lr", "0.1", "--method", "dense"]
    runs = [(f"dense-resnet{depth}", [*dense, "--model", f"cifar/resnet{depth}"]) for depth in (14, 8)]
    for level in LEVELS_FIRST:  # the recommended recipe and its static peer at every level first
        runs += [(f"dlcg-b{level}", [*finetune, "--method", "dlcg", "--budget", str(level)]),
                 (f"static-f{level}", [*finetune, "--method", "static", "--static-fraction", str(level)])]
    for level in LEVELS_FIRST[:3]:  # three levels each for the other methods, as the issue asks
        runs += [
            (f"channel-b{level}", [*finetune, "--method", "channel", "--budget", str(level)]),
            (f"aig-t{level}", [*finetune, "--method", "layer", "--target", str(level), "--loss-weight", "10"]),
            (f"budget-b{level}", [*finetune, "--method", "dlcg", "--budget", str(level), "--warm-start", "0"]),
        ]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="finetuning epochs")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all, in plan order)")
    parser.add_argument("--resume-from", type=Path,
                        help="published runs to count as done (results/cifar10/runs once this sweep published there)")
    parser.add_argument("train_arguments", nargs=argparse.REMAINDER, help="after --: passed to every train.py run")
    args = parser.parse_args()
    common = [a for a in args.train_arguments if a != "--"]
    folder = args.out / "cifar10"
    reference = folder / "dense-resnet20"  # the starting point, for report.py's tables
    reference.mkdir(parents=True, exist_ok=True)
    if not (reference / "model.pt").exists():
        shutil.copy(DENSE, reference / "model.pt")
    for name, arguments in plan(args.epochs):
        run = folder / name
        if args.only and name not in args.only or (run / "model.pt").exists():
            continue
        published = args.resume_from / name if args.resume_from else None
        if published and (published / "model.pt").exists() and (published / "summary.json").exists():
            shutil.copytree(published, run, dirs_exist_ok=True)
            continue
        command = [sys.executable, str(TRAIN), "--dataset", "cifar10", *arguments, *common, "--out", str(run)]
        run.mkdir(parents=True, exist_ok=True)
        (run / "command.txt").write_text(" ".join(command[1:]) + "\n")
        print(" ".join(command), flush=True)
        with open(run / "train.log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


if __name__ == "__main__":
    main()
