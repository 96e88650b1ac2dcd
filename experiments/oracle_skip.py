"""How much could per-image block skipping save at all? An oracle's answer, as an upper bound.

For each image, blocks are switched off greedily, the most expensive first among those whose removal
leaves the model's prediction unchanged, until no block can go. The oracle sees the result of every
choice, which no gate can, so its savings bound what input-dependent layer gating could reach on
top of the model at no change of any prediction. Run on a gated checkpoint (its own decisions are the
start) or on a dense model (converted with every gate open)::

    python experiments/oracle_skip.py results/cifar10/runs/dense-resnet20/model.pt \\
        results/cifar10/runs/static-f0.65/model.pt results/cifar10/runs/dlcg-b0.65/model.pt \\
        --dataset cifar10 --split val --images 1000 --out results/cifar10/oracle_skip.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

import gatekit
from gatekit.datasets import load_dataset
from gatekit.macs import static_macs


def layer_gated(model: nn.Module, example: Tensor) -> nn.Module:
    """The model itself if it has layer gates; else (a dense or pruned model) a copy with layer gates,
    open for every input."""
    if not hasattr(model, "gatekit"):
        return gatekit.convert(model, gates="layer", example_input=example)
    if "layer" not in model.gatekit.mode:
        raise SystemExit("oracle_skip needs layer gates: give a DLCG or ConvNet-AIG checkpoint, or a dense model.")
    return model


def forced(model: nn.Module, keep: Tensor):
    """Forward hooks that multiply every gate's layer decisions by ``keep[:, block]``."""
    handles = []
    for index, gate in enumerate(gatekit.gates_of(model).values()):
        def hook(module, inputs, output, index=index):
            channel_gates, layer_gates = output
            module.layer_gates = layer_gates * keep[:, index].to(layer_gates.dtype)
            return channel_gates, module.layer_gates
        handles.append(gate.register_forward_hook(hook))
    return handles


def run(model: nn.Module, images: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions and per-image MACs with blocks switched off where ``keep`` is 0."""
    handles = forced(model, keep)
    try:
        with torch.inference_mode():
            predictions = model(images).argmax(1)
            macs = gatekit.dynamic_macs(model)
    finally:
        for handle in handles:
            handle.remove()
    return predictions, macs


def greedy_skip(model: nn.Module, images: Tensor) -> Tensor:
    """Per image, the blocks the oracle leaves on (1) and switches off (0), as a [images, blocks] mask."""
    keep = torch.ones(len(images), len(gatekit.gates_of(model)))
    reference, macs = run(model, images, keep)
    while True:
        best_saving, best_block = torch.zeros(len(images), dtype=torch.long), torch.full((len(images),), -1)
        for block in range(keep.shape[1]):
            trial = keep.clone()
            trial[:, block] = 0
            predictions, trial_macs = run(model, images, trial)
            saving = torch.where(predictions == reference, macs - trial_macs, torch.zeros_like(macs))
            better = saving > best_saving
            best_saving[better], best_block[better] = saving[better], block
        changed = best_block >= 0
        if not changed.any():
            return keep
        keep[changed, best_block[changed]] = 0
        macs = run(model, images, keep)[1]


def oracle(model: nn.Module, images: Tensor, reference_macs: int | None = None) -> dict:
    """The oracle's savings; fractions of ``reference_macs`` (default: the model's own dense MACs)."""
    start_macs = run(model, images, torch.ones(len(images), len(gatekit.gates_of(model))))[1]
    keep = greedy_skip(model, images)
    macs = run(model, images, keep)[1]
    dense = reference_macs or model.gatekit.dense_macs
    fraction = macs.double() / dense
    return dict(
        start_mean_macs=float(start_macs.double().mean()), oracle_mean_macs=float(macs.double().mean()),
        start_mac_fraction=float(start_macs.double().mean() / dense),
        oracle_mac_fraction=float(fraction.mean()),
        oracle_mac_p5_p50_p95=[float(q) for q in fraction.quantile(torch.tensor([0.05, 0.5, 0.95], dtype=torch.double))],
        blocks_skipped_mean=float((keep == 0).sum(1).double().mean()),
        blocks_skipped_by_block=[float(v) for v in (keep == 0).double().mean(0)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", type=Path, help="fractions of this dense model's MACs (default: each model's own)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_dataset(args.dataset, split=args.split, limit=args.images).tensors
    reference = None
    if args.reference:
        reference = static_macs(gatekit.load(args.reference).eval(), images[:1])
    results = {}
    for checkpoint in args.checkpoints:
        model = layer_gated(gatekit.load(checkpoint).eval(), images[:1]).eval()
        result = oracle(model, images, reference)
        with torch.inference_mode():
            result["accuracy"] = float((model(images).argmax(1) == labels).double().mean())
        results[str(checkpoint)] = result
        print(json.dumps({str(checkpoint): result}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(dataset=args.dataset, split=args.split, images=args.images,
                                            results=results), indent=1))


if __name__ == "__main__":
    main()
