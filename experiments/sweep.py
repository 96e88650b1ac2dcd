"""Issue 5's sweep: every method at several sparsity settings on ResNet20, plus dense and pruned peers.

Per dataset, with the same budget for every method:

1. dense ResNet20, ResNet14 and ResNet8 train from scratch for ``--dense-epochs`` (learning rate 0.1);
2. from the dense ResNet20, ``--finetune-epochs`` (learning rate 0.05) of: DLCG and channel gating
   with the paper's loss at each ``sparsity`` of ``GRIDS``; ConvNet-AIG layer gating with the
   target-rate loss at each ``target``; DLCG with the MAC-budget loss and Torch-Pruning's static peer
   at each ``budget``; and the dense ResNet20 itself, so that it has the same budget. ResNet14 and ResNet8
   finetune densely for the same epochs. Last, DLCG whose channel term counts each channel gate's own
   rate (``--channel-rates raw``, eq. 5 read literally) at the four strongest channel settings.

Each run is ``examples/train.py`` in its own process (``--workers`` at a time, on ``--device``), writing
``OUT/<dataset>/<run>/``. A rerun skips finished runs and resumes unfinished ones. Evaluation is left to
``experiments/report.py``, which reads the val and test splits (this script may run where only the
training images are, see ``experiments/pack_data.py``).

    python experiments/sweep.py --datasets fashion-mnist --dense-epochs 2 --finetune-epochs 1 --out runs/sweep
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
# Settings per method. Finetuning a trained model needs far less pressure than the paper's training
# from scratch (lambda, gamma 0.02-0.1): at 0.004, 300 steps on Fashion-MNIST closed half the blocks.
GRIDS = {
    "full": dict(sparsity=(0.001, 0.0025, 0.006, 0.015),  # lambda = gamma for DLCG, gamma for channel gating
                 targets=(0.8, 0.6, 0.4, 0.2),  # ConvNet-AIG execution-rate targets
                 budgets=(0.8, 0.6, 0.4, 0.25)),  # fractions of the dense MACs: MAC-budget loss, static
    # Three settings a method: what the 64 MiB that a GPU call returns leaves room for (MNIST).
    "small": dict(sparsity=(0.001, 0.004, 0.015), targets=(0.8, 0.5, 0.2), budgets=(0.8, 0.5, 0.25)),
}


@dataclass
class Run:
    name: str
    arguments: list[str]
    after: str | None = None  # a run whose model.pt this one starts from
    process: subprocess.Popen | None = field(default=None, repr=False)


def plan(dataset: str, dense_epochs: int, finetune_epochs: int, grid: str = "full",
         extra_channel: tuple[float, ...] = ()) -> list[Run]:
    """The runs of one dataset, in the order they should start; ``extra_channel``: more gammas for the
    methods whose filters close one by one (channel gating, raw-rate DLCG)."""
    prefix = "mnist" if dataset != "cifar10" else "cifar"
    runs = [Run(f"pretrain-resnet{depth}", ["--method", "dense", "--model", f"{prefix}/resnet{depth}",
                                            "--epochs", str(dense_epochs), "--lr", "0.1"])
            for depth in (20, 14, 8)]

    def finetune(name: str, base: str, *arguments: str) -> Run:
        return Run(name, ["--init", f"{{root}}/{base}/model.pt", "--epochs", str(finetune_epochs),
                          "--lr", "0.05", *arguments], after=base)

    for depth in (20, 14, 8):
        runs.append(finetune(f"dense-resnet{depth}", f"pretrain-resnet{depth}", "--method", "dense"))
    base, settings = "pretrain-resnet20", GRIDS[grid]
    for value in settings["sparsity"]:
        runs.append(finetune(f"dlcg-l{value}-c{value}", base, "--method", "dlcg", "--layer", str(value), "--channel", str(value)))
        runs.append(finetune(f"channel-c{value}", base, "--method", "channel", "--channel", str(value)))
    for target in settings["targets"]:
        runs.append(finetune(f"aig-t{target}", base, "--method", "layer", "--target", str(target)))
    for budget in settings["budgets"]:
        runs.append(finetune(f"budget-b{budget}", base, "--method", "dlcg", "--budget", str(budget)))
        runs.append(finetune(f"static-f{budget}", base, "--method", "static", "--static-fraction", str(budget)))
    for value in extra_channel:
        runs.append(finetune(f"channel-c{value}", base, "--method", "channel", "--channel", str(value)))
    # Last, beyond the issue (added after the MNIST and Fashion-MNIST sweeps): the four strongest gammas.
    for value in (*settings["sparsity"], *extra_channel)[-4:]:
        runs.append(finetune(f"dlcgraw-l{value}-c{value}", base, "--method", "dlcg", "--layer", str(value),
                             "--channel", str(value), "--channel-rates", "raw"))
    return runs


def execute(runs: dict[str, list[Run]], out: Path, workers: int, common: list[str], deadline: float) -> None:
    """Start runs as workers free up and their base run has finished; stop starting at the deadline."""
    # Interleaved across datasets, so that a deadline cuts every dataset's tail, not one dataset.
    waiting = [(dataset, items[i]) for i in range(max(map(len, runs.values())))
               for dataset, items in runs.items() if i < len(items)]
    running: list[tuple[str, Run]] = []
    while waiting or running:
        for dataset, run in list(running):
            if run.process.poll() is not None:
                running.remove((dataset, run))
                status = "done" if run.process.returncode == 0 else f"FAILED ({run.process.returncode})"
                print(f"[{time.strftime('%H:%M:%S')}] {dataset}/{run.name}: {status}", flush=True)
        for dataset, run in list(waiting):
            folder = out / dataset / run.name
            base_ready = run.after is None or (out / dataset / run.after / "model.pt").exists()
            base_failed = run.after is not None and not base_ready and not any(
                r.name == run.after for d, r in waiting + running if d == dataset)
            if (folder / "model.pt").exists() or base_failed or time.time() > deadline:
                waiting.remove((dataset, run))
                if base_failed or time.time() > deadline:
                    print(f"skipped {dataset}/{run.name}: {'base run failed' if base_failed else 'deadline'}")
                continue
            if len(running) < workers and base_ready:
                folder.mkdir(parents=True, exist_ok=True)
                arguments = [a.format(root=out / dataset) for a in run.arguments]
                command = [sys.executable, str(TRAIN), "--dataset", dataset, "--out", str(folder), *common, *arguments]
                (folder / "command.txt").write_text(" ".join(command[1:]) + "\n")
                run.process = subprocess.Popen(command, stdout=open(folder / "stdout.log", "a"),
                                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
                running.append((dataset, run))
                waiting.remove((dataset, run))
        time.sleep(1)


TRAIN_IMAGES = {"cifar10": 45000, "fashion-mnist": 54000, "mnist": 54000}
MAX_FINETUNE_EPOCHS = 30


def calibrate(out: Path, workers: int, common: list[str]) -> float:
    """Training images per second of ``workers`` gated ResNet20 runs at once (their second epochs)."""
    folders = [out / "calibrate" / str(i) for i in range(workers)]
    processes = [
        subprocess.Popen([sys.executable, str(TRAIN), "--dataset", "cifar10", "--method", "dlcg", "--layer", "0.01",
                          "--channel", "0.01", "--epochs", "3", "--train-images", str(256 * 40), "--no-val",
                          "--out", str(folder), *common], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for folder in folders
    ]
    for process in processes:
        process.wait()
    rates = [json.loads((f / "log.jsonl").read_text().splitlines()[-1])["images_per_second"] for f in folders]
    return float(sum(rates))


def epochs_for(seconds: float, images_per_second: float, grids: dict[str, str], mnist_scale: float) -> int:
    """Finetuning epochs (pretraining gets twice as many) that fit ``seconds`` at full concurrency."""
    images = 0.0
    for dataset, grid in grids.items():
        runs = plan(dataset, 2, 1, grid)  # epochs per run at one finetuning epoch
        epochs = sum(int(r.arguments[r.arguments.index("--epochs") + 1]) for r in runs)
        images += TRAIN_IMAGES[dataset] * (mnist_scale if dataset == "mnist" else 1.0) * epochs
    return max(1, int(seconds * images_per_second / images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "cifar10", "mnist"])
    parser.add_argument("--dense-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--time-budget", type=float,
                        help="seconds: measure throughput first and pick the epochs (dense = 2 x finetune) to fit")
    parser.add_argument("--small-grid", nargs="*", default=[], help="datasets that get GRIDS['small']")
    parser.add_argument("--mnist-scale", type=float, default=1.0, help="MNIST's epochs relative to the others'")
    parser.add_argument("--extra-channel", type=float, nargs="*", default=[],
                        help="more gammas for channel gating and raw-rate DLCG (when their filters close too slowly)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no run starts")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("train_arguments", nargs=argparse.REMAINDER,
                        help="after --: passed to every train.py run (e.g. -- --device cuda --no-val)")
    args = parser.parse_args()
    common = [a for a in args.train_arguments if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.time_budget:
        began = time.time()
        rate = calibrate(args.out, args.workers, common)
        remaining = args.time_budget - (time.time() - began)
        grids = {d: "small" if d in args.small_grid else "full" for d in args.datasets}
        args.finetune_epochs = min(MAX_FINETUNE_EPOCHS, epochs_for(remaining, rate, grids, args.mnist_scale))
        args.dense_epochs = 2 * args.finetune_epochs
        if args.deadline == float("inf"):  # stop starting runs that could not finish in time
            longest = args.finetune_epochs * max(TRAIN_IMAGES[d] for d in args.datasets) * args.workers / rate
            args.deadline = remaining - 1.2 * longest
        print(json.dumps(dict(calibrated_images_per_second=rate, seconds_left=round(remaining), deadline=round(args.deadline),
                              finetune_epochs=args.finetune_epochs, dense_epochs=args.dense_epochs)), flush=True)
    if args.dense_epochs is None or args.finetune_epochs is None:
        parser.error("give --dense-epochs and --finetune-epochs, or --time-budget.")
    runs = {}
    for dataset in args.datasets:
        scale = args.mnist_scale if dataset == "mnist" else 1.0
        grid = "small" if dataset in args.small_grid else "full"
        planned = plan(dataset, max(1, round(args.dense_epochs * scale)), max(1, round(args.finetune_epochs * scale)),
                       grid, tuple(args.extra_channel))
        runs[dataset] = [r for r in planned if not args.only or r.name in args.only]
    (args.out / "sweep.json").write_text(json.dumps(dict(vars(args), out=str(args.out), deadline=args.deadline), indent=1))
    execute(runs, args.out, args.workers, common, time.time() + args.deadline)


if __name__ == "__main__":
    main()
