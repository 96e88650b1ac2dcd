"""Does ``MacBudgetLoss(budget=b)`` give b? A plain finetuning loop, measured on held-out images.

A dense ``mnist/resnet8`` is trained for 300 steps on Fashion-MNIST, converted with
``MacBudgetLoss(budget=b)`` at its defaults, and finetuned for 400 steps of 64 images (SGD, cosine
from 0.05). ``--recipe`` adds docs/howto/finetune.md's pieces (warm start at b, no training
noise, gate lr x10, distillation, BN recalibration). The cost is what ``gatekit.profile`` counts
in eval mode on 2,000 ``val`` images. Prints and writes JSON::

    python experiments/budget_landing.py --out results/budget-landing.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gatekit
from gatekit.adapters import example_input, get_model
from gatekit.datasets import load_dataset

MODEL, BATCH = "mnist/resnet8", 64


def train(model, steps: int, images, labels, lr: float, *, gated: bool, teacher=None, gate_lr=None) -> None:
    groups = gatekit.param_groups(model, gate_lr=gate_lr) if gated else model.parameters()
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (BATCH,), generator=generator)
        batch, target = images[index], labels[index]
        logits = model(batch)
        loss = F.cross_entropy(logits, target)
        if teacher is not None:
            loss = (1 - teacher.weight) * loss + teacher(logits, batch)
        if gated:
            loss = loss + gatekit.gate_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def finetune(dense, budget: float, recipe: bool, images, labels, steps: int, **loss_options):
    gated = gatekit.convert(dense, example_input=example_input(MODEL), regularizer=gatekit.MacBudgetLoss(budget=budget, **loss_options))
    if not recipe:
        train(gated, steps, images, labels, 0.05, gated=True)
        return gated
    gatekit.warm_start(gated, budget)
    gatekit.set_noise(gated, 0.0)
    teacher = gatekit.DistillationLoss(dense.eval(), weight=0.7)
    train(gated, steps, images, labels, 0.05, gated=True, teacher=teacher, gate_lr=0.5)
    gatekit.recalibrate_batchnorm(gated, images[:4096])
    return gated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--recipes", choices=("plain", "recipe"), nargs="+", default=["plain", "recipe"])
    parser.add_argument("--weight", type=float, help="MacBudgetLoss weight (default: its default)")
    parser.add_argument("--controller", type=float, help="MacBudgetLoss controller (default: its default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = load_dataset("fashion-mnist", split="train").tensors
    val = load_dataset("fashion-mnist", split="val", limit=2000)
    dense = get_model(MODEL, num_classes=10)
    train(dense, 300, images, labels, 0.1, gated=False)
    dense.eval()
    rows = [dict(method="dense", **_measure(dense, val))]
    print(json.dumps(rows[0]), flush=True)
    for budget in args.budgets:
        for recipe in (name == "recipe" for name in args.recipes):
            began = time.perf_counter()
            options = {k: getattr(args, k) for k in ("weight", "controller") if getattr(args, k) is not None}
            gated = finetune(dense, budget, recipe, images, labels, args.steps, **options)
            row = dict(budget=budget, recipe=recipe, **options, seconds=round(time.perf_counter() - began, 1), **_measure(gated, val))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(rows=rows, steps=args.steps, command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                                            machine=platform.processor() or platform.machine(),
                                            torch=torch.__version__), indent=1))


def _measure(model, val) -> dict:
    report = gatekit.profile(model, val, batch_size=500)
    return dict(val_accuracy=round(report.accuracy, 4), mac_fraction=round(report.mean_macs / report.dense_macs, 4))


if __name__ == "__main__":
    main()
