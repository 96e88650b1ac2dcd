"""Issue 12's ablation: from a trained CIFAR-10 ResNet20, each row adds one piece of the finetuning recipe.

Every row is one ``examples/train.py`` run (``--recipe finetune`` with its pieces switched on one at a
time), evaluated on the ``val`` split; the static pruner with the same distillation is the reference.
Rows that already ran (their ``summary.json`` exists) are skipped, so the script resumes. Then
``--table`` writes ``ablation.md`` and ``ablation.json`` from the run folders::

    python experiments/ablation.py --out runs/ablation --budgets 0.5 0.65 -- --threads 1 --channels-last
    python experiments/ablation.py --out runs/ablation --budgets 0.5 0.65 --table results/cifar10-ablation
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
DENSE = str(Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar10_resnet20_dense.pt")
# Every piece off: the recipe before issue 12 (budget loss with a fixed weight, cold gates, full noise).
TODAY = ["--kd", "0", "--ramp", "0", "--warm-start", "0", "--gate-lr-scale", "1", "--noise-start", "1", "--anneal-noise", "0",
         "--recalibrate", "0", "--controller", "0", "--loss-weight", "20"]


def rows(budget: float) -> list[tuple[str, str, list[str]]]:
    """(name, what the row adds, train.py arguments), each row adding one piece to the one before."""
    steps = [
        ("today", "today's recipe: budget loss (weight 20), cold gates", []),
        ("ramp", "+ budget ramped in over 40 % of the steps", ["--ramp", "0.4"]),
        ("kd", "+ distillation from the dense model (T = 4, weight 0.7)", ["--kd", "0.7"]),
        ("warm", "+ warm start from the magnitude pruner's filters (ramp dropped: it starts at the budget)",
         ["--warm-start", str(budget), "--ramp", "0"]),
        ("deterministic", "+ no training noise: eval decisions throughout, gate lr x10",
         ["--noise-start", "0", "--gate-lr-scale", "10"]),
        ("recal", "+ batch-norm recalibration (4096 images)", ["--recalibrate", "4096"]),
        ("controller", "+ budget controller (dual ascent on deployed cost, step 0.5)", ["--controller", "0.5"]),
        ("shaping", "+ batch-shaping loss (weight 0.75)", ["--batch-shaping", "0.75"]),
    ]
    result, arguments = [], ["--method", "dlcg", "--budget", str(budget), *TODAY]
    for name, label, extra in steps:
        arguments = arguments + extra
        result.append((name, label, arguments))
    by_name = {name: args for name, _, args in result}
    result.insert(4, ("anneal", "alternative to the next row: noise annealed to 0 over the second half, gate lr x10",
                      by_name["warm"] + ["--anneal-noise", "0.5", "--gate-lr-scale", "10"]))
    result.insert(6, ("features", "deterministic row + feature distillation at the gated blocks' inputs (weight 1), not "
                      "carried into the rows below", by_name["deterministic"] + ["--kd-features", "1"]))
    controller = by_name["controller"]
    result.append(("warm-above", "controller row, warm start 10 points above the budget: layer gates spend the rest",
                   controller + ["--warm-start", str(round(budget + 0.1, 3))]))
    result.append(("soft", "controller row, warm-start logits at ±0.5 instead of ±3: gates that can move",
                   controller + ["--warm-logit", "0.5"]))
    keep, start = int(16 * budget) / 16, str(round(budget + 0.01, 3))  # whole sixteenths; + 0.01: the gates' MACs
    fbs = ["--method", "channel", "--channel-keep", str(keep), "--budget", start, "--warm-start", start]
    result.append(("fbs", f"top-k channel gates (FBS), {keep} of each block's filters, warm-started, noise-free, "
                          f"distilled; no layer gates", fbs))
    result.append(("fbs-soft", "top-k row, warm-start logits at ±0.5: top-k keeps the budget while gates move",
                   fbs + ["--warm-logit", "0.5"]))
    result.append(("static", "reference: Torch-Pruning static (L1, uniform), same finetune and distillation",
                   ["--method", "static", "--static-fraction", str(budget), "--kd", "0.7"]))
    return result


def run(out: Path, budgets: list[float], common: list[str], only: list[str] | None = None) -> None:
    for budget in budgets:
        for name, _, arguments in rows(budget):
            if only and name not in only:
                continue
            folder = out / f"b{budget}-{name}"
            if (folder / "summary.json").exists():
                continue
            command = [sys.executable, str(TRAIN), "--dataset", "cifar10", "--init", DENSE, "--recipe", "finetune",
                       *arguments, *common, "--out", str(folder)]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, stdout=open(out / f"b{budget}-{name}.log", "w"), stderr=subprocess.STDOUT)


def table(out: Path, budgets: list[float], destination: Path) -> None:
    import torch

    import gatekit
    from gatekit.datasets import load_dataset
    from gatekit.macs import static_macs

    # Every row as a fraction of the dense ResNet20's MACs (a pruned model's own "dense" is itself).
    reference = static_macs(gatekit.load(DENSE), torch.zeros(1, 3, 32, 32))
    destination.mkdir(parents=True, exist_ok=True)
    lines = ["| budget | row | val acc. % | MACs % | p5 / p50 / p95 % | exec. rate | channel rate | ≠ static mask % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    val_images = load_dataset("cifar10", split="val", limit=1000).tensors[0]
    records = []
    for budget in budgets:
        for name, label, arguments in rows(budget):
            summary_path = out / f"b{budget}-{name}" / "summary.json"
            if not summary_path.exists():
                continue
            summary = json.loads(summary_path.read_text())
            record = dict(budget=budget, row=name, adds=label, arguments=arguments,
                          **{k: v for k, v in summary.items() if k.startswith("val_")})
            records.append(record)
            scale = summary["val_mean_macs"] / summary["val_mac_fraction"] / reference  # own dense -> ResNet20
            spread = " / ".join(f"{100 * scale * summary[f'val_mac_p{p}']:.1f}" for p in (5, 50, 95))
            rates = [f"{summary[k]:.3f}" if k in summary else "–" for k in ("val_execution_rate", "val_channel_rate")]
            differing = _differing_from_static_mask(out / f"b{budget}-{name}" / "model.pt", arguments, val_images)
            record["differing_from_static_mask"] = differing
            lines.append(f"| {budget} | {label} | {100 * summary['val_accuracy']:.2f} | "
                         f"{100 * summary['val_mean_macs'] / reference:.1f} | {spread} | {rates[0]} | {rates[1]} | "
                         f"{'–' if differing is None else f'{100 * differing:.2f}'} |")
    (destination / "ablation.md").write_text("\n".join(lines) + "\n")
    (destination / "ablation.json").write_text(json.dumps(records, indent=1))
    print("\n".join(lines))


def _differing_from_static_mask(checkpoint: Path, arguments: list[str], images) -> float | None:
    """Share of the executed-filter decisions on ``images`` that differ from the warm start's static
    mask (a skipped block differs wherever the mask keeps a filter); None without a warm start."""
    import torch

    import gatekit

    warm = _last_value(arguments, "--warm-start", 0.0)
    if not warm:
        return None
    logit = _last_value(arguments, "--warm-logit", 3.0)
    model = gatekit.load(checkpoint).eval()
    start = gatekit.convert(gatekit.load(DENSE), **model.gatekit.options)
    gatekit.warm_start(start, warm, logit=logit)
    with torch.no_grad():
        model(images)
    differing, total = 0, 0
    for name, gate in gatekit.gates_of(model).items():
        executed = gate.channel_gates if gate.layer_gates is None else gate.channel_gates * gate.layer_gates.unsqueeze(1)
        mask = (gatekit.gates_of(start)[name].channel_head.bias > 0).to(executed.dtype)
        differing += int((executed != mask).sum())
        total += executed.numel()
    return differing / total


def _last_value(arguments: list[str], flag: str, default: float) -> float:
    """The value a flag ends up with on an argparse command line (the last occurrence wins)."""
    values = [float(value) for name, value in zip(arguments, arguments[1:]) if name == flag]
    return values[-1] if values else default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.65])
    parser.add_argument("--table", type=Path, help="write the table here instead of running")
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    parser.add_argument("train_arguments", nargs=argparse.REMAINDER, help="after --: passed to every train.py run")
    args = parser.parse_args()
    if args.table:
        table(args.out, args.budgets, args.table)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out, args.budgets, [a for a in args.train_arguments if a != "--"], args.rows)


if __name__ == "__main__":
    main()
