"""Train one model of the paper's experiments: dense, gated (DLCG, channel, ConvNet-AIG layer) or pruned.

Four recipes (``--recipe``), all SGD with Nesterov momentum 0.9 and weight decay 5e-4 except on gate
parameters, random crop and horizontal flip on CIFAR-10:

- ``paper``: section 4.1 of the paper: from scratch, 400 epochs, batch 256, learning rate 0.1 divided
  by 10 at 50 %, 75 % and 94 % of the epochs (the paper's 200, 300 and 375 of 400).
- ``base``: a dense model trained to convergence on a CPU in hours: from scratch, ``--epochs``
  (default 60) at batch 128, cosine learning rate from 0.1 stepped every batch. This trains the
  CIFAR-10 base of docs/results.md (``results/cifar10-base/``).
- ``short``: the same step schedule as ``paper``, finetuning a dense checkpoint (``--init``) for ``--epochs``
  (default 10) at ``--lr`` 0.05, with the bare sparsity loss.
- ``finetune`` (default with ``--init``): docs/howto/finetune.md's recipe for a trained model, 3
  epochs at batch 128, cosine learning rate from 0.02; for gated methods, distillation from the
  ``--init`` model (``--kd``), channel gates started from a magnitude pruner's solution at the
  budget (``--warm-start``) and trained without noise, on the eval decisions (``--noise-start 0``),
  gate learning rate x10. Without a warm start (ConvNet-AIG, paper loss), the sparsity pressure is
  ramped in (``--ramp``), the training noise annealed to 0 over the second half
  (``--anneal-noise``) and batch-norm statistics recalibrated at the end (``--recalibrate``). The
  static method gets the same distillation.

Methods (``--method``): ``dense``; ``dlcg`` (channel + layer gates), ``channel`` and ``layer`` with the
paper's target-free loss (``--layer`` = lambda, ``--channel`` = gamma), ConvNet-AIG's target-rate loss
(``--target``) or the MAC-budget loss (``--budget``); ``static``: Torch-Pruning removes block-internal
filters of ``--init`` down to ``--static-fraction`` of the dense MACs, then it trains as a dense model.

Each epoch prints (and appends to ``OUT/log.jsonl``) one JSON line; ``OUT/last.pt`` is rewritten every
epoch and a rerun with the same ``--out`` resumes from it. At the end ``OUT/model.pt`` is a
``gatekit.save`` checkpoint (``gatekit profile OUT/model.pt --dataset ... --split test`` evaluates it)
and ``OUT/summary.json`` holds the configuration and final figures. Examples::

    python examples/train.py --dataset cifar10 --method dense --recipe paper --out runs/c10-dense
    python examples/train.py --dataset cifar10 --method dlcg --layer 0.02 --channel 0.03 --recipe paper --out runs/c10-dlcg
    python examples/train.py --dataset fashion-mnist --method dense --epochs 15 --lr 0.1 --out runs/fm-dense
    python examples/train.py --dataset fashion-mnist --method layer --target 0.5 --init runs/fm-dense/model.pt --out runs/fm-aig
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

import gatekit
from gatekit.adapters import get_model
from gatekit.datasets import DATASETS, load_dataset

METHODS = ("dense", "dlcg", "channel", "layer", "static")
GATES = {"dlcg": "channel+layer", "channel": "channel", "layer": "layer"}
MILESTONES = (0.5, 0.75, 0.9375)  # the paper's 200, 300, 375 of 400 epochs
RATE_STRIDE = 10  # training steps between two samples of the gates' execution rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=[n for n in DATASETS if n != "cifar10-jpeg"])
    data.add_argument("--data-root", help="folder with the .npz files (default: $GATEKIT_DATA, ../shared/data)")
    data.add_argument("--download", action="store_true", help="let torchvision download missing data")
    data.add_argument("--train-images", type=int, help="train on this many images of the train split (default: all)")
    data.add_argument("--augment", choices=("auto", "yes", "no"), default="auto",
                      help="random crop + flip (auto: on for cifar10)")
    model = parser.add_argument_group("model and method")
    model.add_argument("--model", help="registered model (default: cifar/resnet20, mnist/resnet20 for 1-channel data)")
    model.add_argument("--method", choices=METHODS, default="dense")
    model.add_argument("--init", type=Path, help="gatekit checkpoint of a dense model to start from")
    model.add_argument("--layer", type=float, default=0.0, help="lambda of the paper's loss (layer term)")
    model.add_argument("--channel", type=float, default=0.0, help="gamma of the paper's loss (channel term)")
    model.add_argument("--channel-rates", choices=("executed", "raw"), default="executed",
                       help="what the channel term counts: filters that ran, or each channel gate's own rate "
                       "(see gatekit.sparsity_loss)")
    model.add_argument("--target", type=float, help="ConvNet-AIG target execution rate (target-rate loss)")
    model.add_argument("--budget", type=float, help="fraction of the dense MACs (MAC-budget loss)")
    model.add_argument("--loss-weight", type=float, help="weight of the target-rate / MAC-budget loss (default: the loss's)")
    model.add_argument("--controller", type=float,
                       help="MAC-budget loss: dual-ascent step of its multiplier (0: plain quadratic loss; default: the loss's)")
    model.add_argument("--batch-shaping", type=float, default=0.0, help="weight of a batch-shaping loss added to the gates' loss")
    model.add_argument("--static-fraction", type=float, help="static: fraction of dense MACs to prune to")
    model.add_argument("--exits", action="store_true", help="add exit heads after every block (gatekit.add_exits), "
                       "fit them alone first (--exit-fit-images), then train them with the network: a joint finetune")
    model.add_argument("--channel-keep", type=float, help="gated methods with channel gates: keep this fraction "
                       "of each block's filters per input, top-k (FBS-style; docs/losses.md)")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--recipe", choices=("paper", "base", "short", "finetune"), default=None,
                        help="paper: 400 epochs at lr 0.1; base: 60 epochs, cosine from 0.1; short: 10 epochs at lr 0.05 from --init; finetune: "
                        "3 epochs, cosine from 0.02, the finetuning recipe (default: finetune with --init, paper without)")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--teacher", type=Path, help="distillation teacher checkpoint (default: --init)")
    recipe.add_argument("--exit-weight", type=float, default=0.1,
                        help="--exits: weight of each exit's loss (gatekit.exit_loss) beside the final head's")
    recipe.add_argument("--exit-fit-images", type=int, default=20000,
                        help="--exits: training images the heads are fitted on alone before the joint finetune")
    recipe.add_argument("--kd", type=float, help="distillation weight from the --init model (finetune: 0.7; 0: off)")
    recipe.add_argument("--kd-temperature", type=float, default=4.0)
    recipe.add_argument("--kd-features", type=float, default=0.0,
                        help="weight of a feature term at the gated blocks' inputs (0: off; it did not pay)")
    recipe.add_argument("--ramp", type=float, help="fraction of the steps over which the sparsity pressure ramps in "
                        "(finetune: 0.4, or 0 with a warm start)")
    recipe.add_argument("--warm-start", type=float, help="start channel gates from a magnitude pruner at this budget "
                        "(finetune: --budget; 0: off)")
    recipe.add_argument("--warm-logit", type=float, default=3.0, help="magnitude of the warm start's gate logits")
    recipe.add_argument("--gate-lr-scale", type=float, help="gate learning rate / network learning rate (finetune: 10)")
    recipe.add_argument("--noise-start", type=float, help="training noise scale before annealing (0: eval decisions "
                        "throughout; finetune: 0 with a warm start, else 1)")
    recipe.add_argument("--anneal-noise", type=float, help="fraction of the steps, at the end, over which the "
                        "training noise goes to 0 (finetune: 0.5 without a warm start; 0: off)")
    recipe.add_argument("--recalibrate", type=int, help="training images to re-estimate batch-norm statistics on at "
                        "the end (finetune: 4096 without a warm start; 0: off)")
    recipe.add_argument("--weight-decay", type=float, default=5e-4)
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="run folder (resumes if it holds last.pt)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    run.add_argument("--channels-last", action="store_true", help="train in channels-last memory format")
    run.add_argument("--compile", action="store_true", help="torch.compile the training forward (about 0.75 of "
                     "eager time on a CPU, after a minute of compiling)")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    run.add_argument("--val-every", type=int, default=0, help="evaluate on the val split every N epochs (0: at the end only)")
    run.add_argument("--no-val", action="store_true", help="never evaluate (data held elsewhere)")
    run.add_argument("--stop-after", type=int, help="leave after this epoch (rerun with the same --out to go on)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    args = parser.parse_args(argv)
    _complete(args, parser)
    return args


def _complete(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the recipe's defaults and refuse combinations that cannot mean what the user wants."""
    args.recipe = args.recipe or ("finetune" if args.init else "paper")
    finetune = args.recipe == "finetune"
    args.epochs = args.epochs or {"paper": 400, "base": 60, "short": 10, "finetune": 3}[args.recipe]
    args.lr = args.lr or {"paper": 0.1, "base": 0.1, "short": 0.05, "finetune": 0.02}[args.recipe]
    args.batch_size = args.batch_size or (128 if args.recipe in ("base", "finetune") else 256)
    gated = args.method in GATES
    if finetune and args.init is None:
        parser.error("--recipe finetune starts from a trained model: give --init.")
    warm = args.budget if finetune and gated and args.method != "layer" and args.budget is not None else 0.0
    args.warm_start = warm if args.warm_start is None else args.warm_start
    # A warm start needs no exploration: training then makes the eval decisions from the first step,
    # so its batch-norm statistics are already those of the deployed network (recalibrating them
    # cost 0.4 points in the ablation). A cold start explores under noise, anneals it away over the
    # second half and recalibrates.
    defaults = dict(kd=0.7 if finetune and (args.method != "dense" or args.exits) else 0.0, ramp=0.4 if finetune and not args.warm_start else 0.0,
                    gate_lr_scale=10.0 if finetune else 1.0, noise_start=0.0 if finetune and args.warm_start else 1.0,
                    anneal_noise=0.5 if finetune and not args.warm_start else 0.0,
                    recalibrate=4096 if finetune and gated and not args.warm_start else 0)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kd and args.init is None and args.teacher is None:
        parser.error("--kd distills from the --init model: give --init (or --teacher).")
    if args.exits and args.compile:
        parser.error("--exits keeps each exit's logits for its loss; train it without --compile.")
    if args.warm_start and (not gated or args.method == "layer"):
        parser.error("--warm-start sets channel gates: use it with --method dlcg or channel.")
    channels = len(DATASETS[args.dataset].mean)
    args.model = args.model or ("cifar/resnet20" if channels == 3 else "mnist/resnet20")
    if args.augment == "auto":
        args.augment = "yes" if args.dataset == "cifar10" else "no"
    if args.method == "static" and (args.init is None or args.static_fraction is None):
        parser.error("--method static prunes a trained model: give --init and --static-fraction.")
    if gated and args.target is not None and args.budget is not None:
        parser.error("give one of --target (target-rate loss) and --budget (MAC-budget loss), not both.")
    if args.channel_keep is not None and args.method not in ("dlcg", "channel"):
        parser.error("--channel-keep sets how many filters the channel gates keep: use --method dlcg or channel.")
    if (gated and args.target is None and args.budget is None and args.layer == 0 and args.channel == 0
            and not (args.method == "channel" and args.channel_keep is not None)):  # top-k alone sets the cost
        parser.error(f"--method {args.method} needs a sparsity loss: --layer/--channel, --target or --budget.")
    if not gated and (args.target is not None or args.budget is not None or args.layer or args.channel):
        parser.error(f"--method {args.method} has no gates: drop --layer/--channel/--target/--budget.")
    if args.method == "channel" and (args.layer or args.target is not None):
        parser.error("--method channel has no layer gates: drop --layer and --target.")
    if args.method == "layer" and args.channel:
        parser.error("--method layer has no channel gates: drop --channel.")
    if args.channel_rates != "executed" and not args.channel:
        parser.error("--channel-rates changes the paper loss's channel term: give --channel too.")


def regularizer(args: argparse.Namespace):
    weight = {} if args.loss_weight is None else {"weight": args.loss_weight}
    controller = {} if args.controller is None else {"controller": args.controller}
    if args.target is not None:
        return gatekit.TargetRateLoss(target=args.target, **weight)
    if args.budget is not None:
        loss = gatekit.MacBudgetLoss(budget=args.budget, **weight, **controller)
    else:
        loss = gatekit.SparsityLoss(layer=args.layer, channel=args.channel, channel_rates=args.channel_rates)
    return [loss, gatekit.BatchShapingLoss(weight=args.batch_shaping)] if args.batch_shaping else loss


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model to train, on CPU: built, loaded from --init, pruned or converted as the method says."""
    start = gatekit.load(args.init) if args.init else get_model(args.model, num_classes=10)
    if args.init and hasattr(start, "gatekit"):
        raise SystemExit(f"--init {args.init} is a gated model; give a dense checkpoint (method dense).")
    if args.method == "static":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
        from static_prune import prune_to_widths, widths_for

        name, kwargs = start.gatekit_source
        kwargs = {k: v for k, v in kwargs.items() if k != "widths"}
        return prune_to_widths(start, name, widths_for(name, args.static_fraction, kwargs), kwargs)
    if args.method in GATES:
        gated = gatekit.convert(start, gates=GATES[args.method], regularizer=regularizer(args),
                                channel_keep=args.channel_keep)
        if args.warm_start:
            gatekit.warm_start(gated, args.warm_start, logit=args.warm_logit)
        return gated
    return start


def add_fitted_exits(model: nn.Module, images: Tensor, labels: Tensor, args: argparse.Namespace, fit: bool) -> nn.Module:
    """``model`` with exit heads after every block, fitted alone on the first --exit-fit-images
    training images (un-augmented), as gatekit.fit_exits does: the joint finetune starts from there."""
    model = gatekit.add_exits(model, example_input=images[:1].cpu())
    if fit:  # a resumed run loads its heads from last.pt
        count = min(args.exit_fit_images, len(images))
        gatekit.fit_exits(model, TensorDataset(images[:count].cpu(), labels[:count].cpu()))
    return model


def build_teacher(args: argparse.Namespace, device: torch.device, model: nn.Module) -> gatekit.DistillationLoss | None:
    """The --init model as a frozen distillation teacher of ``model``, or None without --kd."""
    if not args.kd:
        return None
    teacher = gatekit.load(args.teacher or args.init).to(device).eval()
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    features = dict(features=args.kd_features, student=model) if args.kd_features else {}
    return gatekit.DistillationLoss(teacher, temperature=args.kd_temperature, weight=args.kd, **features)


class GateSchedules:
    """The per-step schedules of a gated finetune: sparsity ramp and noise annealing."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, total_steps: int) -> None:
        gated = hasattr(model, "gatekit")
        ramp_steps = round(args.ramp * total_steps)
        self.sparsity = gatekit.SparsitySchedule(model, steps=ramp_steps) if gated and ramp_steps else None
        anneal_steps = round(args.anneal_noise * total_steps)
        self.noise = (gatekit.NoiseSchedule(model, start=args.noise_start, steps=anneal_steps,
                                            delay=total_steps - anneal_steps)
                      if gated and (anneal_steps or args.noise_start != 1) else None)

    def step(self) -> None:
        for schedule in (self.sparsity, self.noise):
            if schedule is not None:
                schedule.step()

    def state_dict(self) -> dict:
        return {name: getattr(self, name).count for name in ("sparsity", "noise") if getattr(self, name) is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, count in state.items():
            getattr(self, name).load_state_dict({"count": count})


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop of a 4-pixel zero-padded image and a horizontal flip, per image, on the images' device."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    dy, dx = (torch.randint(0, 9, (n,), generator=generator).to(images.device) for _ in range(2))
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def make_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """SGD and its schedule, stepped once per epoch (step recipes) or once per step (cosine, finetune)."""
    gate_lr = args.lr * args.gate_lr_scale if args.gate_lr_scale != 1 else None
    groups = gatekit.param_groups(model, weight_decay=args.weight_decay, gate_lr=gate_lr) if hasattr(model, "gatekit") else [
        {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.weight_decay}
    ]
    if args.exits:  # the heads learn at the gates' rate, without weight decay, as fit_exits trains them
        heads = list(model.gatekit_exit_heads.parameters())
        for group in groups:
            group["params"] = [p for p in group["params"] if all(p is not h for h in heads)]
        groups.append({"params": heads, "weight_decay": 0.0, "lr": args.lr * args.gate_lr_scale})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    if args.recipe in ("base", "finetune"):
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
    milestones = sorted({max(1, round(args.epochs * m)) for m in MILESTONES})
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


def train_epoch(model, images, labels, optimizer, args, generator, teacher=None, per_step=(), forward=None) -> dict:
    """One pass over the training tensors in a seeded random order; returns the epoch's means.

    ``forward`` computes the logits (default: ``model``; a compiled ``model`` with ``--compile``).
    """
    model.train()
    forward = model if forward is None else forward
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    steps = len(labels) // args.batch_size
    keys = ("loss", "task_loss", "gate_loss", "accuracy", "execution_rate", "channel_rate")
    sums = {key: torch.zeros((), device=images.device) for key in keys}
    gated, rate_samples = hasattr(model, "gatekit"), 0
    for step in tqdm(range(steps), disable=not args.progress, leave=False, desc="train"):
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        batch, target = images[index], labels[index]
        if args.augment == "yes":
            batch = augment(batch, generator)
        if args.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, torch.bfloat16, enabled=args.bf16):
            logits = forward(batch)
            task_loss = nn.functional.cross_entropy(logits.float(), target)
            if teacher is not None:  # Hinton et al.: (1 - w) hard targets + w soft targets
                task_loss = (1 - teacher.weight) * task_loss + teacher(logits, batch)
        gate_loss = gatekit.gate_loss(model) if gated else torch.zeros((), device=images.device)
        if args.exits:  # each exit learns the labels and the model's own final logits (SDN, with distillation)
            task_loss = task_loss + args.exit_weight * gatekit.exit_loss(model, target)
        loss = task_loss + gate_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for schedule in per_step:
            schedule.step()
        # Accumulated on the device: a .item() per step would synchronize a GPU every step.
        with torch.no_grad():
            sums["loss"] += loss.detach()
            sums["task_loss"] += task_loss.detach()
            sums["gate_loss"] += gate_loss.detach()
            sums["accuracy"] += (logits.argmax(1) == target).float().mean()
            if gated and step % RATE_STRIDE == 0:  # gate_stats reads values back: not every step
                rates = gatekit.summarize(gatekit.gate_stats(model))
                sums["execution_rate"] += rates["execution_rate"]
                sums["channel_rate"] += rates["channel_rate"]
                rate_samples += 1
    return {key: round(value.item() / (rate_samples if "rate" in key else steps), 5)
            for key, value in sums.items() if gated or "rate" not in key}


def evaluate(model: nn.Module, val: TensorDataset, args: argparse.Namespace) -> dict:
    """Accuracy and mean MACs on the val split (tuning only: test accuracy is reported once, elsewhere)."""
    report = gatekit.profile(model, val, batch_size=500, device=args.device)
    dense = getattr(getattr(model, "gatekit", None), "dense_macs", report.dense_macs)
    macs = torch.tensor(report.per_sample_macs, dtype=torch.float64) / dense
    row = dict(val_accuracy=round(report.accuracy, 5), val_mean_macs=round(report.mean_macs),
               val_mac_fraction=round(macs.mean().item(), 5),
               **{f"val_mac_p{p}": round(torch.quantile(macs, p / 100).item(), 5) for p in (5, 50, 95)})
    if report.blocks:  # eval-mode rates, the paper's Table 1 columns
        row.update(val_execution_rate=round(sum(b.execution_rate for b in report.blocks) / len(report.blocks), 5),
                   val_channel_rate=round(sum(b.channel_rate for b in report.blocks) / len(report.blocks), 5))
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    train = load_dataset(args.dataset, split="train", root=args.data_root, download=args.download,
                         limit=args.train_images)
    images, labels = (tensor.to(device) for tensor in train.tensors)
    val = None if args.no_val else load_dataset(args.dataset, split="val", root=args.data_root, download=args.download)
    model = build_model(args).to(device)
    if args.exits:
        model = add_fitted_exits(model, images, labels, args, fit=not (args.out / "last.pt").exists())
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = build_teacher(args, device, model)
    steps_per_epoch = len(labels) // args.batch_size
    optimizer, schedule = make_optimizer(model, args, steps_per_epoch)
    gate_schedules = GateSchedules(model, args, args.epochs * steps_per_epoch)
    cosine = args.recipe in ("base", "finetune")
    per_step = (schedule, gate_schedules) if cosine else (gate_schedules,)
    # The compiled module shares the model's parameters; checkpoints and evaluation use the model.
    forward = torch.compile(model) if args.compile else model
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch = _resume(args.out / "last.pt", model, optimizer, schedule, generator, gate_schedules)

    for epoch in range(start_epoch, args.epochs):
        began = time.perf_counter()
        row = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"],
                   **train_epoch(model, images, labels, optimizer, args, generator, teacher, per_step, forward))
        if not cosine:
            schedule.step()
        row["seconds"] = round(time.perf_counter() - began, 2)
        row["images_per_second"] = round(len(labels) // args.batch_size * args.batch_size / row["seconds"])
        if args.val_every and not args.no_val and (epoch + 1) % args.val_every == 0 and epoch + 1 < args.epochs:
            row.update(evaluate(model, val, args))
        _log(args.out, row)
        _checkpoint(args.out / "last.pt", model, optimizer, schedule, generator, epoch + 1, gate_schedules)
        if args.stop_after == epoch + 1 and epoch + 1 < args.epochs:
            return {"stopped_after_epoch": epoch + 1}

    if args.recalibrate and hasattr(model, "gatekit"):
        # Eval-mode decisions on un-augmented training images, as the deployed model will see.
        calibration = images[torch.randperm(len(labels), generator=generator)[: args.recalibrate].to(device)]
        gatekit.recalibrate_batchnorm(model, calibration, batch_size=256)
    model.eval()
    gatekit.save(model.to(memory_format=torch.contiguous_format).cpu(), args.out / "model.pt")
    summary = dict(config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   dense_macs=getattr(getattr(model, "gatekit", None), "dense_macs", None),
                   final=_last_row(args.out))
    if not args.no_val:
        summary.update(evaluate(model, val, args))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"summary": summary.get("final"), **{k: v for k, v in summary.items() if k.startswith("val")}}))
    return summary


def _log(out: Path, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "log.jsonl", "a") as file:
        file.write(line + "\n")


def _last_row(out: Path) -> dict:
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else {}


def _checkpoint(path: Path, model, optimizer, schedule, generator, epoch: int, gate_schedules) -> None:
    budget = [loss for loss in _losses(model) if isinstance(loss, gatekit.MacBudgetLoss)]
    state = dict(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                 schedule=schedule.state_dict(), gate_schedules=gate_schedules.state_dict(),
                 multipliers=[loss.multiplier for loss in budget],
                 generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # never a half-written last.pt


def _losses(model: nn.Module) -> list:
    regularizer = getattr(getattr(model, "gatekit", None), "regularizer", None)
    return list(regularizer) if isinstance(regularizer, (list, tuple)) else [regularizer]


def _resume(path: Path, model, optimizer, schedule, generator, gate_schedules) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    gate_schedules.load_state_dict(state.get("gate_schedules", {}))
    budget = [loss for loss in _losses(model) if isinstance(loss, gatekit.MacBudgetLoss)]
    for loss, multiplier in zip(budget, state.get("multipliers", [])):
        loss.multiplier = multiplier
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    print(json.dumps({"resumed_at_epoch": state["epoch"]}), flush=True)
    return state["epoch"]


if __name__ == "__main__":
    main()
