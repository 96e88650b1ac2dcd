"""Evaluate a sweep's checkpoints and write the Table 1-style table, the Fig. 3-style plot and per-run JSON.

Every ``model.pt`` under ``SWEEP/<dataset>/`` is profiled with ``gatekit.profile`` (what ``gatekit
profile`` runs) on the val split and on the test split(s): CIFAR-10 on the 1000 lossless official test
images and, separately, on all 10000 re-encoded as JPEG; and, for CIFAR-10, on val saved as JPEG too
(``val-jpeg``), the held-out stand-in for the JPEG test images. Results go to ``RESULTS/<dataset>/``:
``runs.json`` (every figure of every run), ``table.md``, ``accuracy_vs_macs_<test split>.png`` and
``equal_macs_<split>.md`` (each method's accuracy interpolated at shared MAC fractions, for the claims).
Settings are chosen on val; the test columns are only reported.

    python experiments/report.py runs/sweep --results results
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import gatekit
from gatekit.datasets import jpeg, load_dataset

TEST_SETS = {"cifar10": ("cifar10", "cifar10-jpeg"), "fashion-mnist": ("fashion-mnist",), "mnist": ("mnist",)}
JPEG_QUALITY = 75  # cifar10-jpeg's (../shared/data/README.md): val-jpeg is val as the JPEG test images were made
METHOD_LABELS = {
    "dlcg": "DLCG (paper loss)", "dlcgraw": "DLCG (paper loss, raw channel rates)",
    "channel": "channel gating (paper loss)", "aig": "ConvNet-AIG (layer, target rate)",
    "budget": "DLCG (MAC-budget loss)", "static": "Torch-Pruning static", "dense": "dense",
    "exits-dense": "exits on dense ResNet20", "exits-static": "exits on static", "exits-dlcg": "exits on DLCG",
    "exits-channel": "exits on channel gating",
    "exits-joint1": "exits on static, joint finetune 1 epoch", "exits-joint3": "exits on static, joint finetune 3 epochs",
}


# examples/train.py --recipe finetune: budget loss, warm start (except layer gates), distillation.
RECIPE_LABELS = {
    "dlcg": "DLCG (finetune recipe)", "channel": "channel gating (finetune recipe)",
    "aig": "ConvNet-AIG (finetune recipe)", "budget": "DLCG (budget loss, cold start)",
    "static": "Torch-Pruning static (distilled)",
}


def label(method: str, rows: list[dict]) -> str:
    """The method's name in tables and plots; runs of the finetuning recipe say so."""
    if any(r["method"] == method and r.get("config", {}).get("recipe") == "finetune" for r in rows):
        return RECIPE_LABELS.get(method, METHOD_LABELS.get(method, method))
    return METHOD_LABELS.get(method, method)


def method_of(run: str) -> str:
    """``static-f0.5`` -> ``static``; an exit run ``exits-<backbone>-b<budget>`` -> ``exits-<backbone's method>``."""
    if run.startswith("exits-"):
        return "exits-" + method_of(run.removeprefix("exits-").rsplit("-b", 1)[0])
    return run.split("-")[0]


def evaluate_run(folder: Path, splits: dict[str, torch.utils.data.Dataset]) -> dict:
    """The run's row; a rerun (after an interruption, or with a new split) measures only what its
    ``eval.json`` lacks."""
    cached = folder / "eval.json"
    row = {}
    if cached.exists() and cached.stat().st_mtime >= (folder / "model.pt").stat().st_mtime:
        row = json.loads(cached.read_text())
    if any(split not in row for split in splits):
        row = _evaluate(folder, {s: d for s, d in splits.items() if s not in row}, row)
        cached.write_text(json.dumps(row))
    return row


def _evaluate(folder: Path, splits: dict[str, torch.utils.data.Dataset], row: dict) -> dict:
    model = gatekit.load(folder / "model.pt")
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    row = dict(row, run=folder.name, method=method_of(folder.name), config=summary.get("config", {}),
               train=summary.get("final", {}))
    for split, data in splits.items():
        report = gatekit.profile(model, data, batch_size=500)
        row[split] = dict(
            accuracy=report.accuracy, mean_macs=report.mean_macs, dense_macs=report.dense_macs,
            mac_fraction=report.mean_macs / report.dense_macs, gate_macs=report.gate_macs,
            execution_rate=_mean([b.execution_rate for b in report.blocks]),
            channel_rate=_mean([b.channel_rate for b in report.blocks]),
        )
    return row


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_table(rows: list[dict], dataset: str, reference_macs: int, path: Path) -> None:
    tests = [s for s in rows[0] if s.startswith("test")]
    header = ["method", "run", "λ", "γ", "target / budget", "layer exec. rate", "channel exec. rate",
              "val acc. %", *[f"{s} acc. %" for s in tests], "GMACs (val)", "% of dense ResNet20"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: (r["method"], -r["val"]["mean_macs"])):
        config, val = row["config"], row["val"]
        goal = config.get("target") or config.get("budget") or config.get("static_fraction") or (config.get("budgets") or [""])[0]
        cells = [label(row["method"], rows), row["run"],
                 _fmt(config.get("layer")), _fmt(config.get("channel")), _fmt(goal),
                 _rate(val["execution_rate"]), _rate(val["channel_rate"]), f"{100 * val['accuracy']:.2f}",
                 *[f"{100 * row[s]['accuracy']:.2f}" for s in tests],
                 f"{val['mean_macs'] / 1e9:.4f}", f"{100 * val['mean_macs'] / reference_macs:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


GATED_MARKERS = {"dlcg": "o-", "dlcgraw": "v-", "channel": "s-", "aig": "^-", "budget": "D-",  # curves in the plot
                 "exits-dense": "P--", "exits-static": "X--", "exits-dlcg": "h--", "exits-channel": "d--",
                 "exits-joint1": "<--", "exits-joint3": ">--"}
COMPARED_FRACTIONS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.65, 0.8, 0.9)


def accuracy_at(points: list[tuple[float, float]], fraction: float) -> float | None:
    """Accuracy at ``fraction`` of the MACs, linear between the two neighbouring (fraction, accuracy)
    points; None outside their span: no extrapolation."""
    points = sorted(points)
    for x, y in points:
        if x == fraction:
            return y
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= fraction <= x1:
            return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
    return None


def write_equal_macs(rows: list[dict], split: str, path: Path) -> None:
    """Accuracy (%) of each method at each of ``COMPARED_FRACTIONS`` of the dense ResNet20's MACs."""
    reference = next(r[split]["mean_macs"] for r in rows if r["run"] == "dense-resnet20")
    methods = [m for m in (*GATED_MARKERS, "static") if any(r["method"] == m for r in rows)]
    lines = [f"Accuracy on `{split}` (%), interpolated at equal fractions of the dense ResNet20's MACs "
             "(–: outside the method's runs).", "",
             "| % of MACs | " + " | ".join(label(m, rows) for m in methods) + " |",
             "|" + "---|" * (len(methods) + 1)]
    for fraction in COMPARED_FRACTIONS:
        values = [accuracy_at(points(rows, m, split, reference), fraction) for m in methods]
        cells = ["–" if v is None else f"{100 * v:.2f}" for v in values]
        lines.append(f"| {100 * fraction:.0f} | " + " | ".join(cells) + " |")
    dense = sorted((r[split]["mean_macs"] / reference, r["run"], r[split]["accuracy"])
                   for r in rows if r["method"] == "dense")
    lines += ["", "Dense: " + ", ".join(f"{run} {100 * a:.2f} % at {100 * f:.1f} %" for f, run, a in dense) + "."]
    path.write_text("\n".join(lines) + "\n")


def points(rows: list[dict], method: str, split: str, reference: float) -> list[tuple[float, float]]:
    """(MAC fraction, accuracy) of a method's runs on ``split``. Exit runs on several backbones share
    a budget: of those, the one best on val stands for the method (settings are chosen on val)."""
    runs = [r for r in rows if r["method"] == method]
    if method.startswith("exits-"):
        best = {}
        for r in runs:
            budget = r["config"].get("budgets", [r["run"]])[0]
            if budget not in best or r["val"]["accuracy"] > best[budget]["val"]["accuracy"]:
                best[budget] = r
        runs = list(best.values())
    return [(r[split]["mean_macs"] / reference, r[split]["accuracy"]) for r in runs]


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _fmt(value) -> str:
    """A setting: "–" where it is unset or 0 (a loss term that is off)."""
    if value in (None, "", 0, 0.0):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(rows: list[dict], dataset: str, split: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, marker in GATED_MARKERS.items():
        curve = sorted((x * 1e-6, 100 * y) for x, y in points(rows, method, split, 1.0))
        if curve:
            axes.plot(*zip(*curve), marker, label=label(method, rows))
    for method, marker in (("static", "x"), ("dense", "*")):
        marks = [(r[split]["mean_macs"] / 1e6, 100 * r[split]["accuracy"], r["run"]) for r in rows if r["method"] == method]
        if marks:
            axes.plot([m[0] for m in marks], [m[1] for m in marks], marker, markersize=10, linestyle="none",
                      label=label(method, rows))
            for x, y, name in marks:
                if method == "dense":
                    axes.annotate(name.removeprefix("dense-"), (x, y), textcoords="offset points", xytext=(4, 4))
    references = [100 * r[split]["accuracy"] for r in rows if r["method"] in ("dense", "static")]
    floor = min(references) - 5  # far weaker runs would squash the curves that matter into a band
    hidden = sum(100 * r[split]["accuracy"] < floor for r in rows)
    axes.set_ylim(bottom=floor)
    axes.set_xlabel("mean MACs per image (millions, gates included)")
    axes.set_ylabel(f"top-1 accuracy on {split} (%)")
    axes.set_title(f"{dataset}: accuracy vs MACs" + (f" ({hidden} run{'s' * (hidden > 1)} below {floor:.0f} % not shown)" if hidden else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--datasets", nargs="+", default=list(TEST_SETS))
    parser.add_argument("--copy-checkpoints", action="store_true", help="copy each run's model.pt and logs too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dataset in args.datasets:
        folders = sorted(p.parent for p in (args.sweep / dataset).glob("*/model.pt") if not p.parent.name.startswith("pretrain"))
        if not folders:
            continue
        splits = {"val": load_dataset(dataset, split="val")}
        if "cifar10-jpeg" in TEST_SETS[dataset]:
            splits["val-jpeg"] = load_dataset(dataset, split="val", pixels=jpeg(JPEG_QUALITY))
        for name in TEST_SETS[dataset]:
            splits["test" if name == dataset else f"test-{name.split('-')[-1]}"] = load_dataset(name, split="test")
        out = args.results / dataset
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for folder in folders:
            rows.append(evaluate_run(folder, splits))
            print(json.dumps({"dataset": dataset, "run": folder.name,
                              **{s: round(rows[-1][s]["accuracy"], 4) for s in splits}}), flush=True)
            if args.copy_checkpoints:
                target = out / "runs" / folder.name
                target.mkdir(parents=True, exist_ok=True)
                for file in ("model.pt", "log.jsonl", "summary.json", "command.txt", "eval.json"):
                    if (folder / file).exists():
                        shutil.copy(folder / file, target / file)
        (out / "runs.json").write_text(json.dumps(rows, indent=1))
        reference = next(r["val"]["dense_macs"] for r in rows if r["run"] == "dense-resnet20")
        write_table(rows, dataset, reference, out / "table.md")
        for split in splits:
            if split.startswith("test"):
                plot(rows, dataset, split, out / f"accuracy_vs_macs_{split}.png")
            write_equal_macs(rows, split, out / f"equal_macs_{split}.md")


if __name__ == "__main__":
    main()
