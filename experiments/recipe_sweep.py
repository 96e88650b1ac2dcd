"""The CIFAR-10 comparison of issues 13 and 22: every compared model starts from one trained ResNet20
(``--init``) and gets the same finetuning (``examples/train.py --recipe finetune``, 3 epochs,
distillation from ``--init`` where it applies); exit heads are then fitted on some of the results.

Runs go one after another into ``OUT/cifar10/<name>`` (what ``experiments/report.py`` reads); a run
whose ``model.pt`` exists is skipped, so the sweep resumes, possibly on another machine, from
published checkpoints (``--resume-from results/cifar10/runs``). The dense ResNet14 and ResNet8 are
the base's own (``--smaller results/cifar10-base``: trained with ``--init``'s recipe), or without it
trained from scratch for 20 epochs plus the 3 of finetuning, as issue 13 did::

    python experiments/recipe_sweep.py --out runs/c10 --init results/cifar10-base/resnet20/model.pt \
        --smaller results/cifar10-base -- --threads 1 --channels-last
    python experiments/report.py runs/c10 --results results --datasets cifar10 --copy-checkpoints

The exit runs ``exits-<backbone>-b<budget>`` come from one ``experiments/exits.py`` call per backbone
run: heads fitted on ``train`` once, then one threshold calibrated on ``val`` to each budget (a
fraction of the dense ResNet20's MACs). A second seed goes into its own ``--out`` with ``-- --seed 1``
(train.py's and exits.py's).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
EXITS = ROOT / "experiments" / "exits.py"
SHARED_DENSE = ROOT.parent / "shared" / "models" / "cifar10_resnet20_dense.pt"
LEVELS_FIRST = (0.65, 0.5, 0.25, 0.8)  # ResNet14's MACs (65 %) first: the headline comparison
STATIC_BETWEEN = (0.3, 0.4, 0.35, 0.45, 0.55)  # measured, not interpolated, where exits are compared
EXIT_BUDGETS = {  # backbone run -> budgets of its exits (below the backbone's own MACs)
    "dense-resnet20": (0.8, 0.65, 0.5),
    "static-f0.8": (0.65, 0.55),
    "static-f0.65": (0.5, 0.45, 0.4),
    "static-f0.5": (0.4, 0.35, 0.3),
    "dlcg-b0.65": (0.5, 0.4),
    "dlcg-b0.5": (0.4, 0.3),
    "channel-b0.65": (0.5, 0.4),
    "channel-b0.5": (0.4, 0.3),
    "joint1-static-f0.65": (0.5, 0.45, 0.4),
    "joint3-static-f0.65": (0.5, 0.45, 0.4),
}


def plan(init: Path, epochs: int, smaller: Path | None, folder: Path = Path("RUNS")) -> list[tuple[str, list[str]]]:
    """(run name, train.py arguments, or exits.py's for exit runs), runs in ``folder``. Order: what
    the claims need first."""

    def folder_of(run: str) -> Path:
        return folder / run / "model.pt"

    finetune = ["--init", str(init), "--recipe", "finetune", "--epochs", str(epochs)]
    dense = ["--recipe", "paper", "--epochs", str(20 + epochs), "--lr", "0.1", "--method", "dense"]
    runs = [] if smaller else [(f"dense-resnet{d}", [*dense, "--model", f"cifar/resnet{d}"]) for d in (14, 8)]
    for level in LEVELS_FIRST[:2]:  # static at the two levels the exit verdict rests on, then its exits
        runs.append((f"static-f{level}", [*finetune, "--method", "static", "--static-fraction", str(level)]))
    runs += _exit_runs("dense-resnet20") + _exit_runs("static-f0.65") + _exit_runs("static-f0.5")
    runs += [(f"static-f{level}", [*finetune, "--method", "static", "--static-fraction", str(level)])
             for level in (*STATIC_BETWEEN, *LEVELS_FIRST[2:])]
    runs += _exit_runs("static-f0.8")
    for joint in (1, 3):  # heads-only against a joint finetune of the backbone with its exits, same distillation
        backbone = ["--init", str(folder_of("static-f0.65")), "--teacher", str(init), "--recipe", "finetune",
                    "--epochs", str(joint), "--method", "dense", "--exits"]
        runs += [(f"joint{joint}-static-f0.65", backbone)] + _exit_runs(f"joint{joint}-static-f0.65")
    for level in LEVELS_FIRST:
        runs.append((f"dlcg-b{level}", [*finetune, "--method", "dlcg", "--budget", str(level)]))
    runs += _exit_runs("dlcg-b0.65") + _exit_runs("dlcg-b0.5")
    for level in LEVELS_FIRST[:3]:  # three levels each for the other methods, as issue 13 asks
        runs += [
            (f"channel-b{level}", [*finetune, "--method", "channel", "--budget", str(level)]),
            (f"aig-t{level}", [*finetune, "--method", "layer", "--target", str(level), "--loss-weight", "10"]),
            (f"budget-b{level}", [*finetune, "--method", "dlcg", "--budget", str(level), "--warm-start", "0"]),
        ]
    return runs + _exit_runs("channel-b0.65") + _exit_runs("channel-b0.5")


def _exit_runs(backbone: str) -> list[tuple[str, list[str]]]:
    return [(f"exits-{backbone}", [backbone, *map(str, EXIT_BUDGETS[backbone])])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=SHARED_DENSE, help="the trained ResNet20 every run starts from")
    parser.add_argument("--smaller", type=Path,
                        help="folder with resnet14/ and resnet8/ trained like --init, used as dense-resnet14/8")
    parser.add_argument("--epochs", type=int, default=3, help="finetuning epochs")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all, in plan order)")
    parser.add_argument("--resume-from", type=Path, help="published runs to count as done")
    parser.add_argument("train_arguments", nargs=argparse.REMAINDER, help="after --: passed to every train.py run")
    args = parser.parse_args()
    common = [a for a in args.train_arguments if a != "--"]
    folder = args.out / "cifar10"
    _copy_dense(args.init, folder / "dense-resnet20")  # the starting point, for report.py's tables
    if args.smaller:
        for depth in (14, 8):
            _copy_dense(args.smaller / f"resnet{depth}" / "model.pt", folder / f"dense-resnet{depth}")
    for name, arguments in plan(args.init, args.epochs, args.smaller, folder):
        run = folder / name
        done = [folder / f"{name}-b{b}" for b in arguments[1:]] if name.startswith("exits-") else [run]
        if args.only and name not in args.only or all((r / "model.pt").exists() for r in done):
            continue
        published = [args.resume_from / r.name for r in done] if args.resume_from else []
        if published and all((p / "model.pt").exists() and (p / "summary.json").exists() for p in published):
            for source, target in zip(published, done):
                shutil.copytree(source, target, dirs_exist_ok=True)
            continue
        if name.startswith("exits-"):  # a log beside the runs, not a run folder report.py would read
            backbone, *budgets = arguments
            command = [sys.executable, str(EXITS), "--init", str(folder / backbone / "model.pt"), "--budgets",
                       *budgets, "--save-runs", str(run), "--out", str(folder / f"{name}.json"), *_exit_arguments(common)]
            log_path = folder / f"{name}.log"
        else:
            command = [sys.executable, str(TRAIN), "--dataset", "cifar10", *arguments, *common, "--out", str(run)]
            run.mkdir(parents=True, exist_ok=True)
            (run / "command.txt").write_text(" ".join(command[1:]) + "\n")
            log_path = run / "train.log"
        print(" ".join(command), flush=True)
        with open(log_path, "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def _copy_dense(checkpoint: Path, run: Path) -> None:
    """A trained dense model as a run of the sweep, with its training log where there is one; a model
    still training is copied by a later call."""
    if not checkpoint.exists():
        print(f"{checkpoint} does not exist yet: rerun the sweep once it does, for {run.name}", flush=True)
        return
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "model.pt").exists():
        shutil.copy(checkpoint, run / "model.pt")
        for file in ("log.jsonl", "summary.json"):
            if (checkpoint.parent / file).exists():
                shutil.copy(checkpoint.parent / file, run / file)


def _exit_arguments(common: list[str]) -> list[str]:
    """exits.py takes only the --threads and --seed of the common train.py arguments."""
    return [a for flag in ("--threads", "--seed") if flag in common for a in common[common.index(flag):common.index(flag) + 2]]


if __name__ == "__main__":
    main()
