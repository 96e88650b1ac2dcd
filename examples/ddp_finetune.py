"""Finetune a gated model with DistributedDataParallel: one process per device, gloo on CPU, nccl on GPUs.

    torchrun --nproc_per_node=2 examples/ddp_finetune.py --dataset fashion-mnist --steps 100

Every process builds and converts the same model (same seed), wraps it in DDP and trains on its share
of each global batch. Gate decisions are per sample, so the gates need nothing from the other
processes; the sparsity loss is computed from each process's own batch, like batch norm statistics
(see docs/distributed.md). Rank 0 prints the global execution and channel rates every ``--print-every``
steps and, with ``--save``, writes them and the final weights to a ``.pt`` file.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import gatekit
from gatekit.adapters import get_model


def parse(arguments: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist/resnet8")
    parser.add_argument("--dataset", default="random", choices=["random", "fashion-mnist", "mnist", "cifar10"],
                        help="'random': Gaussian images and random labels (a smoke run, no data needed)")
    parser.add_argument("--size", type=int, default=28, help="image height and width for --dataset random")
    parser.add_argument("--channels", type=int, default=1, help="image channels for --dataset random")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split evenly over the processes")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--layer", type=float, default=0.002, help="lambda of gatekit.SparsityLoss")
    parser.add_argument("--channel", type=float, default=0.002, help="gamma of gatekit.SparsityLoss")
    parser.add_argument("--kd", type=float, default=0.0, help="weight of distillation from the model before gating (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sync-bn", action="store_true", help="batch norm statistics over the global batch (GPUs only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--print-every", type=int, default=10, help="print the rates every this many steps")
    parser.add_argument("--save", help="write per-step rates and the final weights to this file (rank 0)")
    return parser.parse_args(arguments)


def global_batches(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's global batch, identical on every process: ``steps * batch_size`` examples."""
    count = args.steps * args.batch_size
    if args.dataset == "random":
        generator = torch.Generator().manual_seed(args.seed + 1)
        images = torch.randn(count, args.channels, args.size, args.size, generator=generator)
        return images, torch.randint(0, 10, (count,), generator=generator)
    from gatekit.datasets import load_dataset

    images, labels = load_dataset(args.dataset, split="train").tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed + 1))
    order = order.repeat(count // len(order) + 1)[:count]
    return images[order], labels[order]


def gate_noise_seed(seed: int, step: int, rank: int, world: int) -> int:
    """Each process's gate noise at each step: different across processes (their samples are
    different samples), reproducible, and the same whatever ran before."""
    return seed * 1_000_003 + step * world + rank


def main(arguments: list[str] | None = None) -> None:
    args = parse(arguments)
    torch.set_num_threads(args.threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over {world} processes")
    local = args.batch_size // world

    torch.manual_seed(args.seed)  # the same initial weights on every process
    images, labels = global_batches(args)
    model = get_model(args.model)
    gated = gatekit.convert(model, example_input=images[:1],
                            regularizer=gatekit.SparsityLoss(layer=args.layer, channel=args.channel)).to(device)
    # The teacher stays outside DDP: each process runs its own copy, nothing to synchronize.
    distill = gatekit.DistillationLoss(model.eval().to(device), weight=args.kd) if args.kd else None
    if args.sync_bn:  # replaces the BN modules in place; the traced graph calls them by name
        gated = nn.SyncBatchNorm.convert_sync_batchnorm(gated)
    # Every parameter takes part in every step (closed gates multiply by 0 but keep the gradient
    # path, straight-through), so the default find_unused_parameters=False is right.
    ddp = nn.parallel.DistributedDataParallel(gated, device_ids=[device.index] if backend == "nccl" else None)
    optimizer = torch.optim.SGD(gatekit.param_groups(ddp), lr=args.lr, momentum=0.9, nesterov=True)

    history = []
    for step in range(args.steps):
        start = step * args.batch_size + rank * local
        x, y = images[start : start + local].to(device), labels[start : start + local].to(device)
        torch.manual_seed(gate_noise_seed(args.seed, step, rank, world))
        output = ddp(x)
        loss = nn.functional.cross_entropy(output, y) + gatekit.gate_loss(ddp)
        if distill is not None:
            loss = loss + distill(output, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(global_rates(gated, device))
        if rank == 0 and (step + 1) % args.print_every == 0:
            summary = gatekit.summarize(history[-1])
            print(f"step {step + 1}: loss {loss.item():.3f} (rank 0), executed {summary['execution_rate']:.3f}, "
                  f"channels {summary['channel_rate']:.3f}", flush=True)
    if rank == 0 and args.save:
        torch.save({"rates": history, "state_dict": gated.state_dict(), "world": world}, args.save)
    # Leave together. A process that tears down its gloo connections while another still holds
    # them open (rank 0 saving, on a loaded machine) makes that one's gloo thread throw "connection
    # closed by peer", which aborts it (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def global_rates(gated: nn.Module, device: torch.device) -> dict[str, gatekit.BlockStats]:
    """gate_stats over the global batch: each process's rates, averaged (the shares are equal)."""
    stats = gatekit.gate_stats(gated)
    rates = torch.tensor([[s.execution_rate, s.channel_rate] for s in stats.values()], device=device, dtype=torch.float64)
    dist.all_reduce(rates)
    rates /= dist.get_world_size()
    return {name: gatekit.BlockStats(*map(float, row)) for name, row in zip(stats, rates.tolist())}


if __name__ == "__main__":
    main()
