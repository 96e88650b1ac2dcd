"""Train a small ResNet, gate it with gatekit, finetune it to skip work, and report what it skips.

Offline, in about four minutes on two CPU cores (data from ``../shared/data``, ``$GATEKIT_DATA`` or
``--data-root``; torchvision downloads it with ``--download``)::

    python examples/finetune.py                          # Fashion-MNIST, mnist/resnet20
    python examples/finetune.py --eval-split val         # for tuning --layer / --channel
    python examples/finetune.py --layer 0.004 --channel 0.004   # more pressure: fewer blocks, lower accuracy
    python examples/finetune.py --threads 1              # on a machine another job keeps busy

With the defaults, test accuracy went from 0.84 (dense) to 0.83 (gated) with 77% of the blocks
executed. On the val split, lambda = gamma = 0.002 / 0.003 / 0.004 executed 77% / 58% / 51% of the
blocks at accuracy 0.84 / 0.81 / 0.77 (dense 0.86). Short finetuning mostly learns which blocks to
skip and for which inputs; filters of an executed block all stay on.

1. A dense ResNet trains for one epoch on a subset of the training split.
2. ``gatekit.convert`` puts a channel + layer gate into every residual block, with the paper's
   target-free sparsity loss attached (lambda = ``--layer``, gamma = ``--channel``).
3. A plain PyTorch loop finetunes it: the only gatekit lines are ``param_groups`` and ``gate_loss``.
   One JSON line per segment logs the losses and the gates' execution rates.
4. In eval mode (deterministic gates) it reports accuracy and the mean execution / channel rates
   over the evaluation split, per block, and writes everything to ``--out/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import gatekit
from gatekit.adapters import example_input, get_model
from gatekit.datasets import DATASETS, load_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="folder with the .npz files (default: $GATEKIT_DATA, ../shared/data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing data")
    parser.add_argument("--dataset", default="fashion-mnist", choices=[n for n in DATASETS if n != "cifar10-jpeg"])
    parser.add_argument("--model", help="a name from gatekit.adapters.list_models() (default: mnist/resnet20, "
                        "cifar/resnet20 for cifar10)")
    parser.add_argument("--train-images", type=int, default=19200, help="size of the training subset")
    parser.add_argument("--epochs", type=int, default=1, help="dense training epochs over the subset")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="gated finetuning epochs over the subset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of dense training")
    parser.add_argument("--finetune-lr", type=float, default=0.05)
    parser.add_argument("--layer", type=float, default=0.002, help="lambda: weight of the layer sparsity term")
    parser.add_argument("--channel", type=float, default=0.002, help="gamma: weight of the channel sparsity term")
    parser.add_argument("--log-every", type=int, default=50, help="finetuning steps per JSON log line")
    parser.add_argument("--eval-split", default="test", choices=["val", "test"], help="tune on val, report test")
    parser.add_argument("--eval-images", type=int, help="evaluate on this many images (default: the whole split)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"), help="folder for summary.json")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: where another process shares a 2-core machine, two torch threads waiting
    # on each other made these small batches ten times slower (measured: 3.3 s against 0.3 s a step).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    args.model = args.model or ("cifar/resnet20" if args.dataset == "cifar10" else "mnist/resnet20")
    return args


def loader(dataset: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))


def train_dense(model: nn.Module, data: DataLoader, args: argparse.Namespace) -> None:
    """Ordinary training: SGD with Nesterov momentum and a one-cycle learning rate."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(data), pct_start=0.2)
    model.train()
    for epoch in range(args.epochs):
        for images, labels in tqdm(data, desc=f"dense epoch {epoch + 1}", leave=False):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log(phase="dense", epoch=epoch + 1, loss=loss.item())


def finetune(gated: nn.Module, data: DataLoader, args: argparse.Namespace) -> None:
    """The usual training loop plus two gatekit lines: param_groups and gate_loss."""
    optimizer = torch.optim.SGD(
        gatekit.param_groups(gated, weight_decay=5e-4), lr=args.finetune_lr, momentum=0.9, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.finetune_epochs * len(data))
    gated.train()
    segment, step = [], 0
    for epoch in range(args.finetune_epochs):
        for images, labels in tqdm(data, desc=f"finetune epoch {epoch + 1}", leave=False):
            task_loss = nn.functional.cross_entropy(gated(images), labels)
            sparsity = gatekit.gate_loss(gated)
            optimizer.zero_grad()
            (task_loss + sparsity).backward()
            optimizer.step()
            schedule.step()
            step += 1
            segment.append(dict(task_loss=task_loss.item(), gate_loss=sparsity.item(),
                                **gatekit.summarize(gatekit.gate_stats(gated))))
            if step % args.log_every == 0 or step == args.finetune_epochs * len(data):
                log(phase="finetune", step=step, **{key: mean(row[key] for row in segment) for key in segment[0]})
                segment = []


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 500) -> dict:
    """Accuracy, and for a gated model the execution and channel rates, averaged over every image."""
    model.eval()
    correct, blocks = 0, {}
    for images, labels in DataLoader(dataset, batch_size):
        correct += (model(images).argmax(1) == labels).sum().item()
        if hasattr(model, "gatekit"):
            for name, stats in gatekit.gate_stats(model).items():
                for key, rate in vars(stats).items():
                    blocks.setdefault(name, {}).setdefault(key, 0.0)
                    blocks[name][key] += rate * len(labels) / len(dataset)
    result = {"accuracy": correct / len(dataset)}
    if blocks:
        for key in ("execution_rate", "channel_rate"):
            result[key] = mean(block[key] for block in blocks.values())
        result["blocks"] = blocks
    return result


def print_table(gated: nn.Module, blocks: dict) -> None:
    channels = {site.name: site.channels for site in gated.gatekit.sites}
    print(f"{'block':<10} {'filters':>7} {'executed':>9} {'filters run':>12}")
    for name, rates in blocks.items():
        print(f"{name:<10} {channels[name]:>7} {rates['execution_rate']:>9.2f} {rates['channel_rate']:>12.2f}")


def log(**fields) -> None:
    tqdm.write(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in fields.items()}))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_set = load_dataset(args.dataset, split="train", root=args.data_root, download=args.download, limit=args.train_images)
    eval_set = load_dataset(args.dataset, split=args.eval_split, root=args.data_root, download=args.download, limit=args.eval_images)
    data = loader(train_set, args.batch_size, args.seed)

    model = get_model(args.model, num_classes=10)
    train_dense(model, data, args)
    dense = evaluate(model, eval_set)
    print(f"dense {args.model}: {args.eval_split} accuracy {dense['accuracy']:.4f}")

    regularizer = gatekit.SparsityLoss(layer=args.layer, channel=args.channel)
    gated = gatekit.convert(model, example_input=example_input(args.model), regularizer=regularizer)
    finetune(gated, data, args)
    result = evaluate(gated, eval_set)
    print_table(gated, result["blocks"])
    print(f"gated {args.model}: {args.eval_split} accuracy {result['accuracy']:.4f}, blocks executed "
          f"{result['execution_rate']:.1%}, filters run {result['channel_rate']:.1%} (dense: 100%)")

    summary = dict(args={k: str(v) for k, v in vars(args).items()}, dense=dense, gated=result,
                   seconds=round(time.perf_counter() - started, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    gatekit.save(gated, args.out / "model.pt")
    print(f"summary: {args.out / 'summary.json'} ({summary['seconds']} s)")
    print(f"profile it: gatekit profile {args.out / 'model.pt'} --dataset {args.dataset} --split {args.eval_split}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except gatekit.GatekitError as error:  # data not found and the like: the message says what to do
        raise SystemExit(f"error: {error}") from error
