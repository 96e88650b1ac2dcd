"""One shared exit threshold against one per exit, without touching the test sets: two-fold on `val`.

Each half of the 5,000 `val` images calibrates (``gatekit.calibrate_exits``, shared or ``per_exit``)
and the other half measures; the two folds' figures are averaged. The checkpoints are models with
fitted exits, such as the runs ``experiments/recipe_sweep.py`` writes (``exits-*-b*/model.pt``)::

    python experiments/exit_thresholds.py runs/c10b/cifar10/exits-static-f0.5-b0.4/model.pt --budgets 0.4 0.35 0.3 \
        --out results/cifar10-exits/thresholds-static-f0.5.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import gatekit
from gatekit.datasets import load_dataset

DENSE_RESNET20_MACS = 40_551_040


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--budgets", type=float, nargs="+", required=True)
    parser.add_argument("--reference-macs", type=int, default=DENSE_RESNET20_MACS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = gatekit.load(args.checkpoint).eval()
    images, labels = load_dataset("cifar10", split="val").tensors
    half = len(labels) // 2
    folds = [(TensorDataset(images[:half], labels[:half]), TensorDataset(images[half:], labels[half:])),
             (TensorDataset(images[half:], labels[half:]), TensorDataset(images[:half], labels[:half]))]
    rows = []
    for budget in args.budgets:
        for per_exit in (False, True):
            measured = []
            for calibrate_on, measure_on in folds:
                fitted = gatekit.calibrate_exits(model, calibrate_on, budget=budget, per_exit=per_exit,
                                                 reference_macs=args.reference_macs)
                report = gatekit.profile(model, measure_on, batch_size=500)
                measured.append((fitted.accuracy, report.accuracy, report.mean_macs / args.reference_macs))
            row = dict(budget=budget, per_exit=per_exit,
                       calibration_accuracy=sum(m[0] for m in measured) / 2,
                       held_out_accuracy=sum(m[1] for m in measured) / 2,
                       held_out_mac_fraction=sum(m[2] for m in measured) / 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = dict(command="python experiments/exit_thresholds.py " + " ".join(argv or __import__("sys").argv[1:]),
                  date=time.strftime("%Y-%m-%d"), checkpoint=str(args.checkpoint), rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
