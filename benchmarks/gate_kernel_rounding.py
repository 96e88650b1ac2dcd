"""How often the C gate kernel decides otherwise than torch's operators, on published checkpoints.

The kernel (gatekit/_gate_kernel.c) sums in another order than ATen's pooling and matrix products, so
logits differ in their last bits, and a decision whose logit lies that close to 0 can flip. This runs
each checkpoint's gated model over a test set twice in eval mode: with autograd off (the kernel) and on
(torch's operators, the path training takes), and counts the decisions that differ.

Usage (repository root)::

    python benchmarks/gate_kernel_rounding.py   # about a minute
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

import gatekit
from gatekit._fused_gate import kernel_available
from gatekit.datasets import load_dataset

RESULTS = Path(__file__).parent.parent / "results"
CHECKPOINTS = {  # run folder: data set of its test split
    "fashion-mnist/runs/dlcg-l0.0025-c0.0025": "fashion-mnist",
    "cifar10-short/runs/dlcg-l0.0025-c0.0025": "cifar10",
    "cifar10/runs/dlcg-b0.65": "cifar10",
}


def records(gated: torch.nn.Module, images: torch.Tensor, *, grad: bool) -> dict[str, list[torch.Tensor]]:
    """Every gate's decisions and logits, per batch of 500, channel then layer ones joined."""
    gates = gatekit.gates_of(gated)
    found: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
    for batch in images.split(500):
        with torch.set_grad_enabled(grad):
            gated(batch)
        for name, gate in gates.items():
            decisions = [t for t in (gate.channel_gates, gate.layer_gates) if t is not None]
            logits = [t for t in (gate.channel_logits, gate.layer_logits) if t is not None]
            found[name].append(torch.cat([t.detach().reshape(len(batch), -1) for t in decisions + logits], 1))
    return found


def compare(run: str, dataset: str) -> dict:
    gated = gatekit.load(RESULTS / run / "model.pt").eval()
    images = load_dataset(dataset, split="test").tensors[0]
    kernel, torch_path = records(gated, images, grad=False), records(gated, images, grad=True)
    total = differing = 0
    largest_logit_difference, flipped_logits = 0.0, []
    for name, batches in kernel.items():
        for fast, reference in zip(batches, torch_path[name]):
            half = fast.shape[1] // 2
            flipped = fast[:, :half] != reference[:, :half]
            total += flipped.numel()
            differing += int(flipped.sum())
            largest_logit_difference = max(largest_logit_difference, float((fast[:, half:] - reference[:, half:]).abs().max()))
            flipped_logits += reference[:, half:][flipped].tolist()
    return dict(run=run, dataset=dataset, images=len(images), decisions=total, differing=differing,
                largest_logit_difference=largest_logit_difference, torch_logits_of_flipped=flipped_logits)


def main() -> None:
    if not kernel_available():
        raise SystemExit("gatekit was installed without its C gate kernel: nothing to compare")
    torch.set_num_threads(1)
    rows = []
    for run, dataset in CHECKPOINTS.items():
        rows.append(compare(run, dataset))
        row = rows[-1]
        print(f"{run}: {row['differing']} of {row['decisions']} decisions differ; logits within "
              f"{row['largest_logit_difference']:.2e}; torch logits of the flipped: {row['torch_logits_of_flipped']}")
    day = datetime.date.today().isoformat()
    output = Path(__file__).parent / "results" / f"gate_kernel_rounding_{day}.json"
    output.write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=2))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
