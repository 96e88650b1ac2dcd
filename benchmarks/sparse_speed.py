"""Do gates really save time? Dense vs masked vs sparse vs statically pruned ResNets at equal MACs.

For each model, sparsity level and batch size this times, side by side:

- ``dense``: the original model;
- ``masked``: the gated model in eval mode (computes everything, multiplies by the decisions);
- ``sparse``: ``gatekit.sparse(gated)`` (union strategy), and at batch > 1 also ``per_sample``
  (``strategy="per-sample"``);
- ``static``: the original model pruned with Torch-Pruning to the same per-block channel counts,
  its closed blocks' branches removed: a dense model with physically smaller layers and the same MACs;
- ``compact``: ``gatekit.sparse(gatekit.compact(gated, images))``: what every group decides alike
  (filters no group keeps, layer gates no group closes) folded into the architecture, the rest sparse.

Gate decisions are forced, not learned. Each block keeps the same number of filters for every
sample, and each stage closes the same number of equal-cost blocks, so every sample costs the same
MACs and one static model matches them all. Samples fall into ``GROUPS`` groups (sample ``s`` is in
group ``s % GROUPS``); groups keep different filters (the kept window is rotated by the group) and
close different blocks of a stage (the closed set is rotated too). The gates compute these decisions
themselves: their images carry a group-specific pattern, and each gate's first linear layer is
solved (least squares on the group means of its pooled input) so that hidden unit ``g`` is 1 for
group ``g`` and 0 otherwise; its heads then map each group to its decisions with logits of +-50.
Every decision, every per-sample MAC count and the outputs (sparse = masked, static = masked on
group 0) are checked on 8 images before timing; larger batches repeat those 8 images.

Latencies are medians over repeats; speedups and ratios are medians of the ratios within each
repeat, which hold up better when other processes load the machine.

Usage (from the repository root; needs the ``bench`` extra: ``pip install -e .[bench]``)::

    python benchmarks/sparse_speed.py            # full run, 5 to 7 minutes on 2 CPU cores
    python benchmarks/sparse_speed.py --quick    # smoke test (batch 1 and 8), about 2 minutes
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

# On a shared machine, OpenMP threads that spin while waiting for a busy core made 2-thread
# latencies up to 100x worse (ResNet20: 540 ms instead of 6 ms); passive waiting avoids that.
# It must be set before torch loads OpenMP; set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch_pruning
from torch import Tensor, nn

import gatekit
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model

MODELS = {
    "resnet20": ("cifar/resnet20", (3, 32, 32)),
    "resnet18": ("torchvision/resnet18", (3, 224, 224)),
    "resnet50": ("torchvision/resnet50", (3, 224, 224)),
}
LEVELS = (0.75, 0.5, 0.25)  # target fractions of the dense MACs
# Share of each stage's closable blocks (those after the first) closed at each level.
CLOSED_SHARE = {0.75: 0.0, 0.5: 1 / 3, 0.25: 1 / 2}
GROUPS = 4
LOGIT = 50.0
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Plan:
    """Forced decisions of one sparsity level: filters kept per block, blocks each group closes."""

    target: float
    keep: dict[str, int]
    closed: dict[str, frozenset[int]]  # block name -> the groups that skip it

    def active(self, site: gatekit.GateSite, group: int) -> list[int]:
        """The filters group ``group`` keeps: a window of ``keep`` filters rotated by the group."""
        start = group * site.channels // GROUPS
        return [(start + offset) % site.channels for offset in range(self.keep[site.name])]


def plan_level(gated: nn.Module, target: float) -> Plan:
    """Close a share of each stage's later blocks, then pick the filter fraction nearest the target."""
    sites = gated.gatekit.sites
    closed = {site.name: frozenset() for site in sites}
    for stage in _closable_by_stage(sites).values():
        count = math.floor(CLOSED_SHARE[target] * len(stage) + 0.5)
        for group in range(GROUPS):
            for offset in range(count):
                name = stage[(group + offset) % len(stage)]
                closed[name] = closed[name] | {group}
    best = None
    for step in range(1, 65):
        keep = {site.name: max(1, round(step / 64 * site.channels)) for site in sites}
        plan = Plan(target, keep, closed)
        error = abs(plan_macs(gated, plan) / gated.gatekit.dense_macs - target)
        if best is None or error < best[0]:
            best = (error, plan)
    return best[1]


def _closable_by_stage(sites) -> dict[str, list[str]]:
    """Blocks with an identity shortcut after a stage's first block: the same cost within a stage."""
    stages: dict[str, list[str]] = {}
    for site in sites:
        stage, index = site.name.rsplit(".", 1)
        if index != "0" and site.shortcut == "identity":
            stages.setdefault(stage, []).append(site.name)
    return stages


def plan_macs(gated: nn.Module, plan: Plan) -> int:
    """Per-sample MACs of group 0 (every group costs the same), by the rule of docs/macs.md."""
    info, gates = gated.gatekit, gatekit.gates_of(gated)
    total = info.dense_macs - sum(site.branch_macs for site in info.sites)
    for site in info.sites:
        total += gates[site.name].macs
        if 0 not in plan.closed[site.name]:
            scaled = site.channel_macs // site.channels * plan.keep[site.name]
            total += site.branch_macs - site.channel_macs + scaled
    return total


def group_images(shape: tuple[int, ...], count: int = 2 * GROUPS, seed: int = 0) -> Tensor:
    """``count`` random images, sample ``s`` in group ``s % GROUPS``; each group shares a strong
    pattern of its own, so that gates can tell the groups apart."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn((GROUPS,) + shape, generator=generator)
    patterns += 2 * torch.randn(GROUPS, shape[0], 1, 1, generator=generator)
    return patterns[torch.arange(count) % GROUPS] + 0.3 * torch.randn((count,) + shape, generator=generator)


def batch_of(images: Tensor, batch: int) -> Tensor:
    """The first ``batch`` of ``images`` repeated: samples keep their group and their checked decisions."""
    return images[torch.arange(batch) % images.shape[0]]


def script_gates(gated: nn.Module, plan: Plan, images: Tensor) -> None:
    """Set every gate's weights so that it outputs ``plan``'s decisions for each group of ``images``."""
    groups = torch.arange(images.shape[0]) % GROUPS
    sites = {gatekit.gated_model.gate_key(site.name): site for site in gated.gatekit.sites}
    handles = []
    for key, gate in gated.gatekit_gates.items():
        def solve(gate, inputs, site=sites[key]):
            _solve_gate(gate, site, plan, inputs[0].flatten(2).mean(2), groups)

        handles.append(gate.register_forward_pre_hook(solve))
    try:
        with torch.no_grad():
            gated(images)  # each gate is solved on its real input, its upstream gates already solved
    finally:
        for handle in handles:
            handle.remove()


def _solve_gate(gate: gatekit.Gate, site: gatekit.GateSite, plan: Plan, pooled: Tensor, groups: Tensor) -> None:
    means = torch.stack([pooled[groups == g].mean(0) for g in range(GROUPS)]).double()
    design = torch.cat([means, means.new_ones(GROUPS, 1)], 1)
    hidden = gate.fc.out_features
    target = -torch.ones(GROUPS, hidden, dtype=torch.float64)
    target[:, :GROUPS] += 2 * torch.eye(GROUPS, dtype=torch.float64)  # unit g: +1 for group g, -1 otherwise
    solution = torch.linalg.pinv(design) @ target
    # Contiguous, as trained weights are: the C gate kernel reads only contiguous parameters.
    gate.fc.weight.data = solution[:-1].T.float().contiguous()
    gate.fc.bias.data = solution[-1].float()
    channel_logits = torch.full((site.channels, hidden), 0.0)
    channel_logits[:, :GROUPS] = -LOGIT
    for group in range(GROUPS):
        channel_logits[plan.active(site, group), group] = LOGIT
    gate.channel_head.weight.data, gate.channel_head.bias.data = channel_logits, torch.zeros(site.channels)
    layer_logits = torch.zeros(1, hidden)
    layer_logits[0, :GROUPS] = torch.tensor([-LOGIT if g in plan.closed[site.name] else LOGIT for g in range(GROUPS)])
    gate.layer_head.weight.data, gate.layer_head.bias.data = layer_logits, torch.zeros(1)


def check_decisions(gated: nn.Module, plan: Plan, images: Tensor) -> Tensor:
    """Run ``gated`` and raise unless every gate made the planned decisions; return the output."""
    with torch.no_grad():
        output = gated(images)
    groups = torch.arange(images.shape[0]) % GROUPS
    for site in gated.gatekit.sites:
        gate = gatekit.gates_of(gated)[site.name]
        for sample, group in enumerate(groups.tolist()):
            channels = torch.zeros(site.channels)
            channels[plan.active(site, group)] = 1
            opens = float(group not in plan.closed[site.name])
            if not (torch.equal(gate.channel_gates[sample], channels) and gate.layer_gates[sample].item() == opens):
                raise RuntimeError(f"block {site.name}: sample {sample} did not get its planned decisions")
    return output


def static_model(model: nn.Module, gated: nn.Module, plan: Plan, example: Tensor) -> nn.Module:
    """``model`` with group 0's decisions made permanent: closed branches removed, filters pruned."""
    model = copy.deepcopy(model)
    for site in gated.gatekit.sites:
        if 0 in plan.closed[site.name]:
            # Every closable block computes relu(branch + x); a closed one is relu(x).
            parent, child = site.name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, nn.ReLU())
    graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example)
    for site in gated.gatekit.sites:
        if 0 in plan.closed[site.name] or plan.keep[site.name] == site.channels:
            continue
        conv = model.get_submodule(site.first_conv)
        pruned = list(range(plan.keep[site.name], site.channels))  # group 0 keeps the first filters
        graph.get_pruning_group(conv, torch_pruning.prune_conv_out_channels, idxs=pruned).prune()
    return model.eval()


def time_variants(
    variants: dict[str, Callable[[], Tensor]], repeats: int, min_seconds: float
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each repeat; repeats interleave the variants (rotating order).

    One warmup call each; calls are looped within a repeat until it lasts ``min_seconds``.
    """
    loops = {}
    for name, run in variants.items():
        start = time.perf_counter()
        run()
        loops[name] = max(1, math.ceil(min_seconds / (time.perf_counter() - start)))
    return time_interleaved(variants, repeats, loops)


def prepare(model: nn.Module, level: float, images: Tensor) -> dict:
    """The gated, sparse and static models of one level, checked against each other on ``images``."""
    gated = gatekit.convert(model, example_input=images[:1]).eval()
    plan = plan_level(gated, level)
    script_gates(gated, plan, images)
    masked_output = check_decisions(gated, plan, images)
    macs = gatekit.dynamic_macs(gated)
    if not bool((macs == plan_macs(gated, plan)).all()):
        planned = plan_macs(gated, plan)
        raise RuntimeError(f"level {level}: dynamic MACs {macs.tolist()} differ from the plan's {planned}")
    models = dict(
        masked=gated, sparse=gatekit.sparse(gated), per_sample=gatekit.sparse(gated, strategy="per-sample"),
        static=static_model(model, gated, plan, images[:1]), compact=gatekit.sparse(gatekit.compact(gated, images)),
    )
    group0 = torch.arange(images.shape[0]) % GROUPS == 0
    with torch.inference_mode():
        for strategy in ("sparse", "per_sample", "compact"):
            torch.testing.assert_close(models[strategy](images), masked_output, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(models["static"](images)[group0], masked_output[group0], atol=1e-4, rtol=1e-4)
    sites = gated.gatekit.sites
    return dict(
        models=models, macs=int(macs[0]), closed_blocks=sum(0 in plan.closed[site.name] for site in sites),
        mean_channel_keep=statistics.mean(plan.keep[site.name] / site.channels for site in sites),
    )


def run_model(
    name: str, batches: tuple[int, ...], repeats: dict[int, int], min_seconds: float, layout: torch.memory_format,
    device: torch.device,
) -> list[dict]:
    """Time every variant of one model at every level and batch size; one row per level and batch."""
    model_name, shape = MODELS[name]
    model = get_model(model_name).eval()
    images = group_images(shape)
    dense_macs = gatekit.macs.static_macs(model, images[:1])
    cases = {level: prepare(model, level, images) for level in LEVELS}
    for module in [model] + [m for case in cases.values() for m in case["models"].values()]:
        module.to(device=device, memory_format=layout)  # in place: sparse models keep sharing the gated weights
    rows = []
    for batch in batches:
        # The masked model computes every block whatever its gates decide: timed at one level.
        variants = {"dense": model, "masked": cases[LEVELS[0]]["models"]["masked"]}
        for level, case in cases.items():
            variants.update({f"{kind}@{level}": case["models"][kind] for kind in ("sparse", "per_sample", "static", "compact")})
            if batch == 1:  # one sample: both strategies run the same passes
                del variants[f"per_sample@{level}"]
        inputs = batch_of(images, batch).to(device).contiguous(memory_format=layout)
        with torch.inference_mode():
            callers = {key: _caller(module, inputs, device) for key, module in variants.items()}
            times = time_variants(callers, repeats[batch], min_seconds)
        rows += [_row(name, batch, level, case, dense_macs, times) for level, case in cases.items()]
    return rows


def _caller(module: nn.Module, inputs: Tensor, device: torch.device) -> Callable[[], Tensor]:
    if device.type != "cuda":
        return lambda: module(inputs)

    def call() -> Tensor:  # a latency includes the kernels, not only their launch
        output = module(inputs)
        torch.cuda.synchronize()
        return output

    return call


def _row(name: str, batch: int, level: float, case: dict, dense_macs: int, times: dict[str, list[float]]) -> dict:
    """Latencies are medians; speedups and ratios are medians of within-repeat ratios."""
    dense, static, union, compact = times["dense"], times[f"static@{level}"], times[f"sparse@{level}"], times[f"compact@{level}"]
    per_sample = times.get(f"per_sample@{level}", union)
    ideal = dense_macs / case["macs"]
    row = dict(
        model=name, batch=batch, target=level, mac_fraction=case["macs"] / dense_macs,
        closed_blocks=case["closed_blocks"], mean_channel_keep=case["mean_channel_keep"], ideal_speedup=ideal,
    )
    latencies = dict(dense=dense, masked=times["masked"], static=static, sparse=union, per_sample=per_sample, compact=compact)
    for key, samples in latencies.items():
        row[f"{key}_ms"] = 1e3 * statistics.median(samples)
    row["masked_over_dense"] = paired_ratio(times["masked"], dense)
    for key, samples in (("static", static), ("sparse", union), ("per_sample", per_sample), ("compact", compact)):
        row[f"{key}_speedup"] = paired_ratio(dense, samples)
        row[f"{key}_of_ideal"] = row[f"{key}_speedup"] / ideal
        if key != "static":
            row[f"{key}_over_static"] = paired_ratio(samples, static)
    return row


COLUMNS = (  # header, row key, format
    ("model", "model", "<9"), ("batch", "batch", ">5"), ("MACs", "mac_fraction", ">5.0%"),
    ("dense ms", "dense_ms", ">9.1f"), ("masked", "masked_ms", ">8.1f"), ("static", "static_ms", ">8.1f"),
    ("union", "sparse_ms", ">8.1f"), ("per-smp", "per_sample_ms", ">8.1f"), ("compact", "compact_ms", ">8.1f"),
    ("ideal x", "ideal_speedup", ">7.2f"), ("mask/d", "masked_over_dense", ">6.2f"),
    ("static x", "static_speedup", ">8.2f"), ("union x", "sparse_speedup", ">7.2f"),
    ("p-s x", "per_sample_speedup", ">6.2f"), ("cp x", "compact_speedup", ">6.2f"),
    ("un/st", "sparse_over_static", ">6.2f"), ("ps/st", "per_sample_over_static", ">6.2f"),
    ("cp/st", "compact_over_static", ">6.2f"),
    ("st/ideal", "static_of_ideal", ">8.0%"), ("un/ideal", "sparse_of_ideal", ">8.0%"),
    ("ps/ideal", "per_sample_of_ideal", ">8.0%"), ("cp/ideal", "compact_of_ideal", ">8.0%"),
)


def table(rows: list[dict]) -> str:
    """Plain-text table; at batch 1 both strategies are the same run (per-sample repeats union)."""
    lines = [" ".join(f"{header:{fmt.split('.')[0].rstrip('f%')}}" for header, _, fmt in COLUMNS)]
    lines += [" ".join(f"{row[key]:{fmt}}" for _, key, fmt in COLUMNS) for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    names = [line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")]
    return dict(
        cpu=names[0] if names else platform.processor(), threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        torch=torch.__version__, gatekit=gatekit.__version__,
        torch_pruning=metadata.version("torch-pruning"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), omp_wait_policy=os.environ["OMP_WAIT_POLICY"], load_average=os.getloadavg(),
    )


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 1 and 8, one or two repeats")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 32; --quick: 1 8)")
    parser.add_argument("--channels-last", action="store_true", help="run every model and input channels-last")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (models are prepared on CPU, then moved)")
    parser.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/sparse_speed_<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, repeats, min_seconds = ((1, 8), {1: 2, 8: 1}, 0.0) if args.quick else ((1, 32), {1: 21, 32: 3}, 0.05)
    if args.batches:  # one repeat count per batch size: many at batch 1, few for the slow large batches
        batches = tuple(args.batches)
        repeats = {batch: repeats.get(batch, repeats[max(repeats)] if batch > 1 else repeats[1]) for batch in batches}
    load_at_start = os.getloadavg()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    day = datetime.date.today().isoformat()
    variant = ("quick_" if args.quick else "") + ("channels_last_" if args.channels_last else "")
    variant += "cuda_" if args.device.startswith("cuda") else ""
    output = args.output or RESULTS / f"sparse_speed_{variant}{day}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        command=" ".join(sys.argv), quick=args.quick, channels_last=args.channels_last, device=args.device, batches=batches,
        repeats=repeats, min_seconds=min_seconds, load_average_at_start=load_at_start,
    )
    for name in args.models:
        started = time.perf_counter()
        rows += run_model(name, batches, repeats, min_seconds, layout, torch.device(args.device))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        # Saved after every model: a run cut short still leaves what it measured.
        output.write_text(json.dumps(dict(machine=machine(), settings=settings, rows=rows), indent=2))
    print(table(rows))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
