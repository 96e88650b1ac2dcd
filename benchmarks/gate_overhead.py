"""What gating costs at batch 1 on a CPU, and what gatekit.compact saves on trained checkpoints.

Part 1, ResNet20 at 32x32, batch 1 (the deployment case of issue 15): dense; masked (the gated model
in eval mode, every gate open); masked with each gate returning its decisions computed beforehand (the
floor: what calling a gate costs when it computes nothing); masked with its module calls written as
fx writes them, one lookup per name of the module's path (``gatekit._module_lookups`` undone on a
copy: what hoisting the parent lookups saves); masked with its module calls bound to flat attributes
as the sparse model's are (``gatekit.sparse._bind_called_modules``, on a copy); sparse with every
gate open, and the same with each sparse block taking its gate's decisions computed beforehand;
sparse with 4 and 5 of the 9 blocks closed for every input. "ideal x" is dense MACs / dynamic MACs.
Part 2, the CIFAR-10 checkpoints of the earlier short sweep
(``results/cifar10-short/runs/``), whose gates vary: compacted on the ``val`` split (calibration),
checked on ``test`` (held out), and timed at batch 1 on the test images, each call taking the next
image: masked, sparse, compact + sparse.

Variants take turns within each repeat (benchmarks/_timing.py); ratios are medians of within-repeat
ratios, which hold up when another job loads the machine. Part 3 prints torch.profiler's table of one
sparse block.

Usage (repository root)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/gate_overhead.py   # about 4 minutes
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from torch import nn

import gatekit
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model
from gatekit.datasets import load_dataset
from gatekit.sparse import SparseBlock, _bind_called_modules

RUNS = Path(__file__).parent.parent / "results" / "cifar10-short" / "runs"
CHECKPOINTS = (
    "dlcgraw-l0.015-c0.015", "dlcgraw-l0.006-c0.006", "dlcg-l0.006-c0.006", "channel-c0.015", "aig-t0.4", "budget-b0.4",
)
CLOSED = {
    "4 of 9": ("layer1.1", "layer2.1", "layer2.2", "layer3.1"),
    "5 of 9": ("layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1"),
}
RESULTS = Path(__file__).parent / "results"


def closed_copy(gated: nn.Module, blocks: tuple[str, ...]) -> nn.Module:
    """A copy of ``gated`` whose listed blocks are closed for every input, the others open."""
    closed = copy.deepcopy(gated)
    for name, gate in gatekit.gates_of(closed).items():
        if name in blocks:
            gate.layer_head.bias.data.fill_(-50.0)
    return closed


def ideal_speedup(gated: nn.Module, image: torch.Tensor) -> float:
    with torch.no_grad():
        gated(image)
    return gated.gatekit.dense_macs / gatekit.dynamic_macs(gated).item()


class Precomputed(nn.Module):
    """Returns what ``gate`` returned on its first call, whatever the input: a gate that computes nothing."""

    def __init__(self, gate: gatekit.Gate, example: torch.Tensor) -> None:
        super().__init__()
        with torch.inference_mode():
            self.decisions = gate(example)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.decisions


def inputs_on(model: nn.Module, modules: list[nn.Module], image: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """The input each of ``modules`` (inside ``model``) gets when ``model`` runs on ``image``."""
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[0]))
             for module in modules]
    with torch.inference_mode():
        model(image)
    for hook in hooks:
        hook.remove()
    return inputs


def precomputed_copy(gated: nn.Module, image: torch.Tensor) -> nn.Module:
    """A copy of ``gated`` whose gates are :class:`Precomputed` on their inputs for ``image``."""
    copied = copy.deepcopy(gated)
    inputs = inputs_on(copied, list(copied.gatekit_gates.values()), image)
    for key, gate in list(copied.gatekit_gates.items()):
        copied.gatekit_gates[key] = Precomputed(gate, inputs[gate])
    return copied


def sparse_precomputed_copy(sparse_model: nn.Module, image: torch.Tensor) -> nn.Module:
    """A copy of ``sparse_model`` whose sparse blocks take the decisions their gates made on ``image``
    instead of computing them: what the sparse model costs without its gates."""
    copied = copy.deepcopy(sparse_model)
    blocks = [module for module in copied.modules() if isinstance(module, SparseBlock)]
    for block, x in inputs_on(copied, blocks, image).items():
        with torch.inference_mode():
            bits = block.fused.decision_bytes(x)
        block.fused.decision_bytes = lambda x, bits=bits: bits
    return copied


def part_one(repeats: int) -> dict:
    torch.manual_seed(0)
    dense = get_model("cifar/resnet20").eval()
    gated = gatekit.convert(dense).eval()
    image = torch.randn(1, 3, 32, 32)
    unhoisted = copy.deepcopy(gated)
    unhoisted.graph._codegen._body_transformer = None
    unhoisted.recompile()
    bound = copy.deepcopy(gated)
    _bind_called_modules(bound)
    variants = {"dense": dense, "masked": gated, "masked, gates precomputed": precomputed_copy(gated, image),
                "masked, lookups as fx writes them": unhoisted, "masked, module calls bound": bound,
                "sparse, all open": gatekit.sparse(gated)}
    variants["sparse, all open, gates precomputed"] = sparse_precomputed_copy(variants["sparse, all open"], image)
    ideals = {"sparse, all open": ideal_speedup(gated, image)}
    for label, blocks in CLOSED.items():
        closed = closed_copy(gated, blocks)
        variants[f"sparse, {label} closed"] = gatekit.sparse(closed)
        ideals[f"sparse, {label} closed"] = ideal_speedup(closed, image)
    with torch.inference_mode():
        reference = gated(image)
        for name in ("masked, gates precomputed", "masked, lookups as fx writes them", "masked, module calls bound",
                     "sparse, all open", "sparse, all open, gates precomputed"):
            torch.testing.assert_close(variants[name](image), reference, atol=1e-4, rtol=1e-4)
        calls = {name: (lambda model=model: model(image)) for name, model in variants.items()}
        for call in calls.values():
            call()
        times = time_interleaved(calls, repeats, loops=20)
    rows = []
    for name, samples in times.items():
        speedup = paired_ratio(times["dense"], samples)
        row = dict(
            variant=name, ms=1e3 * statistics.median(samples), over_dense=paired_ratio(samples, times["dense"]),
            speedup=speedup,
        )
        if name in ideals:
            row.update(ideal=ideals[name], of_ideal=speedup / ideals[name])
        rows.append(row)
    return dict(rows=rows)


class Cycling:
    """Calls ``model`` on the next image of ``images`` each time (batch 1)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model, self.images, self.next = model, images.split(1), 0

    def __call__(self) -> torch.Tensor:
        image = self.images[self.next % len(self.images)]
        self.next += 1
        return self.model(image)


def part_two(repeats: int, timed_images: int, names: tuple[str, ...]) -> list[dict]:
    calibration = load_dataset("cifar10", split="val").tensors[0]
    test_images, test_labels = load_dataset("cifar10", split="test").tensors
    rows = []
    for name in names:
        gated = gatekit.load(RUNS / name / "model.pt").eval()
        compacted = gatekit.compact(gated, calibration)
        report = compacted.gatekit_compaction
        with torch.no_grad():
            gated_correct = (gated(test_images).argmax(1) == test_labels).sum().item()
            compact_correct = (compacted(test_images).argmax(1) == test_labels).sum().item()
            test_difference = (gated(test_images) - compacted(test_images)).abs().max().item()
        timed = test_images[:timed_images]
        variants = {"masked": gated, "sparse": gatekit.sparse(gated), "compact+sparse": gatekit.sparse(compacted)}
        with torch.inference_mode():
            calls = {key: Cycling(model, timed) for key, model in variants.items()}
            for call in calls.values():
                call()
            times = time_interleaved(calls, repeats, loops=timed_images)
        rows.append(dict(
            run=name, blocks=[block.__dict__ for block in report.blocks],
            calibration_samples=report.calibration_samples, calibration_differing=report.differing_samples,
            calibration_max_difference=report.max_output_difference,
            test_samples=len(test_labels), test_differing=report.differing(gated, test_images),
            test_max_difference=test_difference, gated_test_correct=gated_correct, compact_test_correct=compact_correct,
            dense_macs_before=report.dense_macs_before, dense_macs_after=report.dense_macs_after,
            ms={key: 1e3 * statistics.median(samples) for key, samples in times.items()},
            compact_over_sparse=paired_ratio(times["compact+sparse"], times["sparse"]),
            sparse_over_masked=paired_ratio(times["sparse"], times["masked"]),
        ))
        print(f"{name}: compact+sparse / sparse {rows[-1]['compact_over_sparse']:.3f}, "
              f"test differing {rows[-1]['test_differing']}/{len(test_labels)}", flush=True)
    return rows


def part_three() -> str:
    dense = get_model("cifar/resnet20").eval()
    block = gatekit.sparse(gatekit.convert(dense).eval()).gatekit_sparse_blocks.layer2_1
    x = torch.randn(1, 32, 16, 16)
    with torch.inference_mode():
        for _ in range(50):
            block(x, x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(200):
                block(x, x)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--timed-images", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=list(CHECKPOINTS))
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/gate_overhead_<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    day = datetime.date.today().isoformat()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    first = part_one(args.repeats)
    for row in first["rows"]:
        extra = f"  ideal {row['ideal']:.2f}x, {100 * row['of_ideal']:.0f}% of ideal" if "ideal" in row else ""
        print(f"{row['variant']:<26} {row['ms']:7.2f} ms  {row['over_dense']:5.3f} x dense{extra}", flush=True)
    second = part_two(max(5, args.repeats // 4), args.timed_images, tuple(args.runs))
    profile_table = part_three()
    print(profile_table)
    result = dict(
        machine=dict(cpu=platform.processor(), torch=torch.__version__, threads=1, started=started,
                     load_average=os.getloadavg(), host=platform.node()),
        resnet20_batch1=first, checkpoints=second, sparse_block_profile=profile_table,
    )
    output = args.output or RESULTS / f"gate_overhead_{day}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
