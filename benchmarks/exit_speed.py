"""Do exits really save time? Dense vs masked vs sparse models with exits, against their MAC saving.

For each model, MAC budget and batch size this times, side by side (``_timing.time_interleaved``):

- ``dense``: the original model;
- ``masked``: the model with exits in eval mode: every sample runs everything, then takes the
  logits of its exit (what ONNX exports);
- ``sparse``: ``gatekit.sparse(model)``: at batch 1 it returns at the exit; at batch N it carries on
  with the samples that remain only.

The exit heads are untrained (random linear heads), and one threshold is chosen on the benchmark's
own images so that their mean MACs come nearest the budget.
Timing needs the decisions, not their quality. ``gatekit.profile`` gives the MACs actually spent on
those images, and the sparse outputs are checked against the masked ones before timing. At batch 1
a call runs every image once, one at a time, so its time covers the same mix of exits as batch N.

Usage (from the repository root)::

    python benchmarks/exit_speed.py            # ResNet20 at 32 x 32 and resnet50 at 224 x 224, one thread
    python benchmarks/exit_speed.py --quick    # smoke test: ResNet20 only, few repeats
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see sparse_speed.py: spinning waits on a shared machine

import torch

import gatekit
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model
from gatekit.exit_macs import exit_costs_per_sample

MODELS = {"resnet20": ("cifar/resnet20", (3, 32, 32)), "resnet50": ("torchvision/resnet50", (3, 224, 224))}
BUDGETS = (0.75, 0.5)
RESULTS = Path(__file__).parent / "results"


def model_with_exits(name: str, images: torch.Tensor, budget: float):
    """The dense model and a copy with random exit heads, thresholded so that ``images`` spend about
    ``budget`` of the dense MACs."""
    torch.manual_seed(0)
    dense = get_model(MODELS[name][0], num_classes=10).eval()
    exits = gatekit.add_exits(dense, example_input=images[:1]).eval()
    for head in exits.gatekit_exit_heads.values():
        torch.nn.init.normal_(head.classifier[0].weight, std=0.5)
    policy = exits.gatekit_exit_policy
    with torch.no_grad():
        exits(images)
    confidences = policy.confidences(policy.exit_logits)
    costs = exit_costs_per_sample(exits).double()
    target = budget * exits.gatekit_exits.dense_macs

    def mean_macs(threshold: torch.Tensor) -> float:
        taken = policy.decide(confidences, threshold.expand(confidences.shape[1]))
        return costs[torch.arange(len(costs)), taken].mean().item()

    candidates = confidences.flatten().unique()
    policy.thresholds.copy_(min(candidates, key=lambda t: abs(mean_macs(t) - target)).expand(confidences.shape[1]))
    return dense, exits


def measure(name: str, batch: int, budget: float, repeats: int) -> dict:
    shape = MODELS[name][1]
    images = torch.randn((batch if batch > 1 else 32, *shape), generator=torch.Generator().manual_seed(1))
    dense, exits = model_with_exits(name, images, budget)
    fast = gatekit.sparse(exits)
    report = gatekit.profile(exits, images, batch_size=len(images))
    exit_rates = [e.rate for e in report.exits]
    with torch.inference_mode():
        torch.testing.assert_close(fast(images), exits(images), rtol=1e-4, atol=1e-4)

        def run(model):
            if batch > 1:
                return lambda: model(images)
            return lambda: [model(image) for image in images.split(1)]

        calls = {"dense": run(dense), "masked": run(exits), "sparse": run(fast)}
        for call in calls.values():  # warm-up
            call()
        times = time_interleaved(calls, repeats)
    return dict(
        model=name, input=list(shape), batch=batch, budget=budget, images=len(images),
        mac_fraction=report.mean_macs / report.dense_macs, exit_rates=exit_rates,
        seconds_per_image={k: statistics.median(v) / len(images) for k, v in times.items()},
        sparse_over_dense=paired_ratio(times["sparse"], times["dense"]),
        masked_over_dense=paired_ratio(times["masked"], times["dense"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/exit_speed_<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, repeats = (["resnet20"], 3) if args.quick else (list(MODELS), 7)
    rows = []
    for name in models:
        for batch in (1, 32):
            for budget in BUDGETS:
                row = measure(name, batch, budget, repeats)
                rows.append(row)
                print(f"{name:9} batch {batch:2}  MACs {100 * row['mac_fraction']:5.1f} %  "
                      f"time sparse/dense {row['sparse_over_dense']:.3f}  masked/dense {row['masked_over_dense']:.3f}",
                      flush=True)
    result = dict(date=datetime.date.today().isoformat(), machine=platform.machine(), cpus=os.cpu_count(),
                  threads=args.threads, torch=torch.__version__, quick=args.quick, rows=rows)
    out = args.out or RESULTS / f"exit_speed_{result['date']}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
