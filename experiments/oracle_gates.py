"""Can a gate learn the oracle's per-image skips? Layer gates trained to imitate ``oracle_skip``.

The network stays frozen (a pruned or dense model, given layer gates); the oracle's skip mask is
computed on ``--train-images`` training images, and each layer gate (pool, FC to 16, ReLU, one
logit) learns it by binary cross-entropy, with the network run on the oracle's decisions (teacher
forcing). Then a common offset on every layer logit trades MACs for accuracy: each offset is one
(accuracy, MACs) point on ``val``, beside the oracle's bound. ``--test`` also evaluates the chosen
offsets on the test sets, once::

    python experiments/oracle_gates.py results/cifar10/runs/static-f0.65/model.pt \\
        --reference ../shared/models/cifar10_resnet20_dense.pt --out results/cifar10/oracle_gates_static-f0.65.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

import gatekit
from gatekit.datasets import load_dataset
from gatekit.macs import static_macs
from oracle_skip import greedy_skip, layer_gated

OFFSETS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def teacher_forced_logits(model: nn.Module, images: Tensor, keep: Tensor) -> Tensor:
    """Every layer gate's logits [images, blocks] with the network run on ``keep``'s decisions."""
    gates = list(gatekit.gates_of(model).values())
    handles = [gate.register_forward_hook(lambda module, inputs, output, index=index: (output[0], keep[:, index]))
               for index, gate in enumerate(gates)]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([gate.layer_logits for gate in gates], dim=1)


def train_gates(model: nn.Module, images: Tensor, keep: Tensor, epochs: int, batch_size: int = 250) -> None:
    """Fit the layer gates to the oracle's mask; nothing else changes."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    gates = list(gatekit.gates_of(model).values())
    parameters = [p for gate in gates for p in gate.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    with torch.no_grad():  # start each gate at its block's oracle keep rate, for every image
        rates = keep.mean(0).clamp(0.01, 0.99)
        for gate, rate in zip(gates, rates):
            gate.layer_head.weight.zero_()
            gate.layer_head.bias.fill_(float(torch.logit(rate)))
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    model.eval()
    for gate in gates:
        gate.train()  # logits with gradient; the network's batch norms stay in eval mode
    gatekit.set_noise(model, 0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            logits = teacher_forced_logits(model, images[batch], keep[batch])
            loss = functional.binary_cross_entropy_with_logits(logits, keep[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def evaluate(model: nn.Module, data: torch.utils.data.Dataset, offset: float, reference_macs: int) -> dict:
    """Accuracy and MACs with every layer logit shifted by ``offset`` (higher: more blocks run)."""
    gates = list(gatekit.gates_of(model).values())
    with torch.no_grad():
        for gate in gates:
            gate.layer_head.bias += offset
    try:
        report = gatekit.profile(model, data, batch_size=500)
    finally:
        with torch.no_grad():
            for gate in gates:
                gate.layer_head.bias -= offset
    return dict(offset=offset, accuracy=report.accuracy, mac_fraction=report.mean_macs / reference_macs,
                execution_rate=sum(b.execution_rate for b in report.blocks) / len(report.blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="the dense model whose MACs are 100 %%")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--test", nargs="*", type=float, default=[], help="offsets to evaluate on the test sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_images = load_dataset("cifar10", split="train", limit=args.train_images).tensors[0]
    model = layer_gated(gatekit.load(args.checkpoint).eval(), train_images[:1]).eval()
    reference = static_macs(gatekit.load(args.reference).eval(), train_images[:1])
    keep = greedy_skip(model, train_images)
    print(json.dumps({"oracle_blocks_skipped_mean": float((keep == 0).sum(1).double().mean())}), flush=True)
    train_gates(model, train_images, keep, args.epochs)
    val = load_dataset("cifar10", split="val")
    result = dict(checkpoint=str(args.checkpoint), train_images=args.train_images, epochs=args.epochs,
                  oracle_blocks_skipped_train=float((keep == 0).sum(1).double().mean()), val=[], test={})
    for offset in OFFSETS:
        result["val"].append(evaluate(model, val, offset, reference))
        print(json.dumps(result["val"][-1]), flush=True)
    for name in ("cifar10", "cifar10-jpeg"):
        if args.test:
            data = load_dataset(name, split="test")
            result["test"][name] = [evaluate(model, data, offset, reference) for offset in args.test]
            print(json.dumps({name: result["test"][name]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
