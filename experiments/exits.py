"""Exit heads on a trained CIFAR-10 model: fit them on `train`, calibrate thresholds on `val` at
MAC budgets, and (with --test) report the test splits once at the thresholds chosen on `val`. A
checkpoint that already has exits (a joint finetune, ``examples/train.py --exits``) is calibrated only.

    python experiments/exits.py --init results/cifar10/runs/static-f0.65/model.pt --budgets 0.5 0.45 0.4 \
        --out results/cifar10-exits/static-f0.65.json

Budgets are fractions of --reference-macs (default: the dense ResNet20, 40,551,040 MACs), so that
exits on a pruned model are compared with other methods at the same fraction of the dense model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gatekit
from gatekit.datasets import load_dataset

DENSE_RESNET20_MACS = 40_551_040


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="gatekit checkpoint of the backbone")
    parser.add_argument("--at", default="blocks", help="'blocks', 'stages' or comma-separated block names")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--rule", default="probability", choices=("probability", "margin", "entropy"))
    parser.add_argument("--fit-temperatures", action="store_true")
    parser.add_argument("--train-images", type=int, default=45000, help="train images the heads are fitted on")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--distill", type=float, default=0.5)
    parser.add_argument("--budgets", type=float, nargs="*", default=[])
    parser.add_argument("--agreements", type=float, nargs="*", default=[])
    parser.add_argument("--reference-macs", type=int, default=DENSE_RESNET20_MACS)
    parser.add_argument("--test", action="store_true", help="also report test and test-jpeg (once, at the end)")
    parser.add_argument("--save-runs", type=Path, metavar="PREFIX",
                        help="save the model calibrated to each budget as a run folder PREFIX-b<budget> "
                             "(model.pt, summary.json), what experiments/report.py reads")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation and sample order")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    backbone = gatekit.load(args.init)
    at = args.at if args.at in ("blocks", "stages") else args.at.split(",")
    if hasattr(backbone, "gatekit_exits"):  # trained with its exits (examples/train.py --exits): calibrate only
        model, head_train_accuracy = backbone.eval(), None
    else:
        model = gatekit.add_exits(backbone, at=at, pool=args.pool, hidden=args.hidden, rule=args.rule).eval()
        train = load_dataset("cifar10", split="train", limit=args.train_images)
        fit = gatekit.fit_exits(model, train, epochs=args.epochs, lr=args.lr, distill=args.distill,
                                 seed=args.seed)
        head_train_accuracy = fit.train_accuracy
    val = load_dataset("cifar10", split="val")
    base = gatekit.profile(model, val, batch_size=500)
    head_accuracy = _head_accuracy(model, val)
    print(json.dumps({"head_val_accuracy": head_accuracy, "fit_seconds": round(time.perf_counter() - began)}), flush=True)
    rows = []
    targets = [("budget", b) for b in args.budgets] + [("agreement", a) for a in args.agreements]
    for kind, value in targets:
        calibration = gatekit.calibrate_exits(model, val, **{kind: value}, reference_macs=args.reference_macs,
                                              fit_temperatures=args.fit_temperatures)
        row = dict(target=kind, value=value, threshold=calibration.thresholds[0],
                   val_accuracy=calibration.accuracy, val_mac_fraction=calibration.mac_fraction,
                   val_agreement=calibration.agreement, val_exit_rates=calibration.exit_rates)
        row.update(_measured("val", gatekit.profile(model, val, batch_size=500), args.reference_macs))
        if args.test:
            for split, name in (("test", "cifar10"), ("test-jpeg", "cifar10-jpeg")):
                report = gatekit.profile(model, load_dataset(name, split="test"), batch_size=500)
                row.update(_measured(split, report, args.reference_macs))
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = dict(
        command="python experiments/exits.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        date=time.strftime("%Y-%m-%d"), seconds=round(time.perf_counter() - began),
        init=str(args.init), config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        backbone_val_accuracy=base.accuracy, backbone_mac_fraction=base.dense_macs / args.reference_macs,
        head_train_accuracy=head_train_accuracy, head_val_accuracy=head_accuracy, head_macs=base.gate_macs, rows=rows,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    for budget in args.budgets if args.save_runs else ():
        gatekit.calibrate_exits(model, val, budget=budget, reference_macs=args.reference_macs,
                                fit_temperatures=args.fit_temperatures)
        run = args.save_runs.parent / f"{args.save_runs.name}-b{budget}"
        run.mkdir(parents=True, exist_ok=True)
        gatekit.save(model, run / "model.pt")
        summary = {**result, "config": {**result["config"], "budgets": [budget]}, "rows": [
            row for row in rows if row["target"] == "budget" and row["value"] == budget]}
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        (run / "command.txt").write_text(result["command"] + "\n")
    return result


def _measured(split: str, report: gatekit.Profile, reference_macs: int) -> dict[str, float]:
    """Accuracy, mean and p5 / p50 / p95 of the per-image MACs, as fractions of ``reference_macs``."""
    macs = torch.tensor(report.per_sample_macs, dtype=torch.float64) / reference_macs
    return {f"{split}_accuracy": report.accuracy, f"{split}_mac_fraction": macs.mean().item(),
            **{f"{split}_mac_p{p}": torch.quantile(macs, p / 100).item() for p in (5, 50, 95)}}


def _head_accuracy(model, data) -> dict[str, float]:
    """Each exit head's accuracy on its own, the final head last."""
    policy = model.gatekit_exit_policy
    images, labels = data.tensors
    correct = None
    with torch.no_grad():
        for start in range(0, len(labels), 500):
            model(images[start:start + 500])
            every = [*policy.exit_logits, policy.final_logits]
            hits = torch.stack([(l.argmax(1) == labels[start:start + 500]).sum() for l in every])
            correct = hits if correct is None else correct + hits
    names = [site.name for site in model.gatekit_exits.sites] + ["final"]
    return {name: round(c.item() / len(labels), 4) for name, c in zip(names, correct)}


if __name__ == "__main__":
    main()
