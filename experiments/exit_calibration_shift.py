"""Exit thresholds calibrated on the deployment's image pipeline: do budgets then hold on JPEG images?

Thresholds calibrated on lossless ``val`` overshoot the MAC budget on ``test-jpeg`` (the heads are less
confident on JPEG images, docs/results.md#exit-gates). This calibrates the same published exit models
on ``val`` re-encoded as JPEG (quality 75, torchvision's encoder: the test set's quality) and measures
accuracy and MACs on ``val``, JPEG ``val``, ``test`` and ``test-jpeg``. Only ``val`` is used to choose::

    python experiments/exit_calibration_shift.py --out results/cifar10-base/comparison/cifar10/exits/calibration-shift.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import gatekit
from gatekit.datasets import jpeg, load_dataset

RUNS = Path(__file__).resolve().parents[1] / "results" / "cifar10-base" / "comparison" / "cifar10" / "runs"
DENSE_RESNET20_MACS = 40_551_040
MODELS = {"exits-static-f0.65-b0.5": (0.5, 0.45, 0.4), "exits-static-f0.5-b0.4": (0.4, 0.35, 0.3)}


def measured(model, data) -> dict:
    report = gatekit.profile(model, data, batch_size=500)
    return dict(accuracy=report.accuracy, mac_fraction=report.mean_macs / DENSE_RESNET20_MACS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--models", nargs="*", metavar="RUN=B1,B2", help="published exit runs and the budgets to "
                        "calibrate them to (default: " + " ".join(f"{r}={','.join(map(str, b))}" for r, b in MODELS.items()) + ")")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of the runs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    models = MODELS if not args.models else {
        run: tuple(map(float, budgets.split(","))) for run, budgets in (m.split("=") for m in args.models)}
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    splits = {"val": load_dataset("cifar10", split="val"),
              "val-jpeg": load_dataset("cifar10", split="val", pixels=jpeg(args.quality)),
              "test": load_dataset("cifar10", split="test"), "test-jpeg": load_dataset("cifar10-jpeg", split="test")}
    rows = []
    for run, budgets in models.items():
        model = gatekit.load(args.runs / run / "model.pt").eval()
        for calibrated_on in ("val", "val-jpeg"):
            for budget in budgets:
                gatekit.calibrate_exits(model, splits[calibrated_on], budget=budget, reference_macs=DENSE_RESNET20_MACS)
                row = dict(model=run, calibrated_on=calibrated_on, budget=budget,
                           **{split: measured(model, data) for split, data in splits.items()})
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = dict(command=" ".join(["python experiments/exit_calibration_shift.py", *sys.argv[1:]]),
                  date=time.strftime("%Y-%m-%d"), seconds=round(time.perf_counter() - began), rows=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
