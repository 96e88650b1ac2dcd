"""Which test images cost a gated model, or one with exits, the fewest and the most MACs? A grid from each end.

The paper's argument is that easy inputs cost less. ``gatekit.profile`` gives every image's exact
MACs; this draws the ``--count`` cheapest and dearest test images with their cost (% of the dense
model) and whether the model got them right, and prints the spread::

    python experiments/per_input.py results/cifar10/runs/dlcg-b0.5/model.pt --dataset cifar10-jpeg \
        --out results/cifar10/per_input.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import gatekit
from gatekit.datasets import DATASETS, load_dataset

CIFAR_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--reference-macs", type=int,
                        help="what the costs are a fraction of (default: the model's own dense MACs); "
                             "40551040 is the dense ResNet20's, for exits on a pruned model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = gatekit.load(args.checkpoint).eval()
    data = load_dataset(args.dataset, split=args.split)
    report = gatekit.profile(model, data, batch_size=500)
    macs = torch.tensor(report.per_sample_macs, dtype=torch.float64) / (args.reference_macs or report.dense_macs)
    images, labels = data.tensors
    with torch.no_grad():
        predictions = torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(labels), 500)])
    correct = predictions == labels
    order = macs.argsort()
    quartiles = [order[i * len(order) // 4:(i + 1) * len(order) // 4] for i in range(4)]
    summary = dict(checkpoint=str(args.checkpoint), dataset=args.dataset, split=args.split,
                   **{f"p{p}": round(torch.quantile(macs, p / 100).item(), 4) for p in (0, 5, 50, 95, 100)},
                   accuracy_by_cost_quartile=[round(correct[q].float().mean().item(), 4) for q in quartiles])
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    _draw(images, labels, correct, macs, order, args)


def _draw(images, labels, correct, macs, order, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = DATASETS[args.dataset]
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (spec.mean, spec.std))
    ends = (("fewest MACs", order[: args.count]), ("most MACs", order.flip(0)[: args.count]))
    figure, axes = plt.subplots(2, args.count, figsize=(1.6 * args.count, 4.2))
    for row, (title, indices) in enumerate(ends):
        for column, index in enumerate(indices.tolist()):
            picture = (images[index] * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1)
            axis = axes[row, column]
            axis.imshow(picture.numpy(), cmap="gray" if picture.dim() == 2 else None)
            name = CIFAR_CLASSES[labels[index]] if "cifar" in args.dataset else str(labels[index].item())
            axis.set_title(f"{name} {'✓' if correct[index] else '✗'}\n{100 * macs[index]:.1f} %", fontsize=8)
            axis.axis("off")
        axes[row, 0].text(-0.15, 0.5, title, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right")
    figure.suptitle(f"{args.checkpoint.parent.name} on {args.dataset} {args.split}: MACs per image, % of dense")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
