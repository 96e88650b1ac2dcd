"""Which residual networks gatekit covers: every model below through convert, finetune, profile, sparse.

For each model, built offline (random weights) and run at a small input, this checks and reports:

- ``blocks``: residual blocks found, and ``channels``: the sum of the channel gates' widths;
- ``preserved``: max |gated - original| / max |original| in eval mode with fresh gates (all open):
  0 up to float rounding, at most ``TOLERANCE``;
- ``sparse``: max |gatekit.sparse(gated) - gated| / max |gated| with random gates (eval mode, both
  batch strategies), at most ``TOLERANCE``; ``macs_run``: the fraction of the dense MACs those gates run;
- ``dense MACs``: gatekit's count against ``FlopCounterMode`` / 2 on the original model (batch 1);
- ``profiled``: whether ``gatekit.profile``'s per-sample MACs equal ``FlopCounterMode`` / 2 of the
  sparse model run on each sample alone, with the same random gates;
- ``fallbacks``: modules sparse execution runs at full width instead of slicing (exact, but they
  save nothing; a conv or linear layer among them also makes the MAC check fail);
- ``finetune``: a few SGD steps with the sparsity loss, in training mode: the loss stays finite and
  every gate gets a gradient.

Batch-norm statistics and affine terms, and layer-scale parameters, are randomized before the checks:
timm zero-initialises each block's last norm and ConvNeXt scales its branches by 1e-6, which would
make any branch look right.

Usage (from the repository root)::

    python benchmarks/coverage.py                                # table, JSON in benchmarks/results/
    python benchmarks/coverage.py --markdown docs/coverage.md    # also regenerate docs/coverage.md
    python benchmarks/coverage.py --models torchvision/convnext_tiny --size 32
    python benchmarks/coverage.py --timm-families --size 64 --markdown docs/coverage.md

``--timm-families`` takes one model of every timm architecture family instead
(benchmarks/_timm_families.py) and, with ``--markdown``, writes its table into the page's timm section.

tests/test_coverage.py runs :func:`check` on every model at a smaller input, and the timm check on
a fixed sample of families.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: its helper modules

import _timm_families  # noqa: E402
import gatekit  # noqa: E402
from gatekit._sliced import Widened  # noqa: E402
from gatekit.adapters import get_model

MODELS = (
    "torchvision/resnet18", "torchvision/resnet50", "torchvision/wide_resnet50_2", "torchvision/resnext50_32x4d",
    "torchvision/mobilenet_v2", "torchvision/mobilenet_v3_small", "torchvision/mobilenet_v3_large",
    "torchvision/efficientnet_b0", "torchvision/regnet_x_400mf", "torchvision/regnet_y_400mf",
    "torchvision/convnext_tiny",
    "timm/resnet50d", "timm/seresnet18", "timm/seresnext26d_32x4d", "timm/resnetv2_50",
    "timm/mobilenetv2_100", "timm/mobilenetv3_small_100", "timm/mobilenetv3_large_100", "timm/efficientnet_b0",
    "timm/regnetx_002", "timm/regnety_002", "timm/convnext_atto", "timm/convnext_tiny",
)
# Feed-forward networks without a residual add: conversion must refuse them with NoResidualBlockError.
NO_RESIDUAL = ("torchvision/vgg11", "torchvision/shufflenet_v2_x0_5")
TOLERANCE = 1e-4


@dataclass
class Coverage:
    """What :func:`check` found for one model; ``status`` is "ok" or the failed checks."""

    model: str
    blocks: int = 0
    channels: int = 0
    preserved: float | None = None
    sparse: float | None = None
    dense_macs: int | None = None
    flop_counter_macs: int | None = None
    profiled: bool | None = None
    macs_run: float | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    finetune: bool | None = None
    seconds: float = 0.0
    status: str = ""


def build(name: str) -> nn.Module:
    """A registered model, or (for the feed-forward ones) torchvision's, with random weights."""
    if name in NO_RESIDUAL:
        return torchvision.models.get_model(name.split("/", 1)[1], weights=None)
    return get_model(name)


def check(name: str, *, size: int = 64, batch: int = 2, finetune_steps: int = 2, seed: int = 0) -> Coverage:
    """Run ``name`` through conversion, finetuning, profiling and sparse execution at ``size`` x ``size``."""
    start = time.perf_counter()
    result = Coverage(name)
    torch.manual_seed(seed)
    model = _randomize(build(name).eval(), seed)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    try:
        gated = gatekit.convert(model, example_input=images[:1])
    except gatekit.NoResidualBlockError as error:
        result.status = "ok: no residual block" if name in NO_RESIDUAL else f"NoResidualBlockError: {error}"
        result.seconds = time.perf_counter() - start
        return result
    sites = gated.gatekit.sites
    result.blocks, result.channels = len(sites), sum(site.channels for site in sites)
    with torch.no_grad():
        expected = model(images)
        result.preserved = ((gated.eval()(images) - expected).abs().max() / expected.abs().max()).item()
    result.dense_macs = gated.gatekit.dense_macs
    result.flop_counter_macs = _flop_counter_macs(model, images[:1])
    result.finetune = _finetune(copy.deepcopy(gated), images, finetune_steps)
    _randomize_gates(gated, seed)
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        masked_output = gated(images)
        # Relative to the output's scale: a freshly initialised classifier's outputs can be tiny.
        result.sparse = max(
            ((sparse_output - masked_output).abs().max() / masked_output.abs().max()).item()
            for sparse_output in (fast(images), gatekit.sparse(gated, strategy="per-sample")(images))
        )
        report = gatekit.profile(gated, images, batch_size=batch)
        measured = [_flop_counter_macs(fast, image) for image in images.split(1)]
    result.macs_run = report.mean_macs / report.dense_macs
    result.profiled = list(report.per_sample_macs) == measured
    widened = [m.module for m in fast.modules() if isinstance(m, Widened) and m.module is not None]
    result.fallbacks = dict(Counter(type(module).__name__ for module in widened))
    failures = [
        text for text, failed in (
            (f"function changed by {result.preserved:.2g}", result.preserved > TOLERANCE),
            (f"sparse differs by {result.sparse:.2g}", result.sparse > TOLERANCE),
            ("dense MACs differ from FlopCounterMode", result.dense_macs != result.flop_counter_macs),
            ("profiled MACs differ from FlopCounterMode on sparse", not result.profiled),
            ("finetuning failed", not result.finetune),
        ) if failed
    ]
    result.status = "; ".join(failures) or "ok"
    result.seconds = time.perf_counter() - start
    return result


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random norm statistics and affine terms, and layer scales near 1: no branch starts as zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator) + 1.0)
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("layer_scale", "gamma"):  # ConvNeXt: 1e-6 at initialisation
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.5 + 0.5)
    return model


def _randomize_gates(gated: nn.Module, seed: int) -> None:
    """Gates whose decisions vary with the input: some blocks and channels off, differently per sample."""
    generator = torch.Generator().manual_seed(seed)
    for gate in gatekit.gates_of(gated).values():
        gate.fc.weight.data = torch.randn(gate.fc.weight.shape, generator=generator)
        for head in (gate.channel_head, gate.layer_head):
            head.weight.data = torch.randn(head.weight.shape, generator=generator) * 2
            head.bias.data = torch.randn(head.bias.shape, generator=generator)


def _flop_counter_macs(model: nn.Module, inputs: Tensor) -> int:
    # Attention on its math kernel: FlopCounterMode has no formula for the fused CPU kernel, and
    # would count its matmuls as 0 (docs/macs.md).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


def _finetune(gated: nn.Module, images: Tensor, steps: int) -> bool:
    """A few SGD steps with the sparsity loss: finite losses and a gradient on every gate parameter.

    Gradients are clipped: with randomized norms, batch statistics of two samples at the last
    stages' few pixels give gradients of 1e7, which the dense model has too.
    """
    gated.train()
    optimizer = torch.optim.SGD(gatekit.param_groups(gated, weight_decay=5e-4), lr=1e-3, momentum=0.9)
    labels = torch.arange(images.shape[0])
    for _ in range(steps):
        output = gated(images)
        loss = nn.functional.cross_entropy(output, labels) + gatekit.sparsity_loss(gated, layer=0.01, channel=0.01)
        optimizer.zero_grad()
        loss.backward()
        gate_gradients = [p.grad for g in gatekit.gates_of(gated).values() for p in g.parameters()]
        if not torch.isfinite(loss) or any(grad is None for grad in gate_gradients):
            return False
        nn.utils.clip_grad_norm_(gated.parameters(), 1.0)
        optimizer.step()
    return True


def table(results: list[Coverage]) -> str:
    """The results as a markdown table."""
    lines = [
        "| model | blocks | channels gated | function preserved | sparse == masked | MACs run | dense MACs (gatekit) | FlopCounterMode / 2 | profile == sparse FLOPs | full-width fallbacks | finetune | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.preserved is None:
            lines.append(f"| {r.model} | 0 | 0 | | | | | | | | | {r.status} |")
            continue
        fallbacks = ", ".join(f"{name} x{count}" for name, count in sorted(r.fallbacks.items())) or "none"
        lines.append(
            f"| {r.model} | {r.blocks} | {r.channels:,} | {r.preserved:.1e} | {r.sparse:.1e} | {r.macs_run:.0%} | {r.dense_macs:,} | "
            f"{r.flop_counter_macs:,} | {_yes(r.profiled)} | {fallbacks} | {_yes(r.finetune)} | {r.status} |"
        )
    return "\n".join(lines)


def _yes(flag: bool | None) -> str:
    return "yes" if flag else "no"


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if sys.platform == "linux" else []
    names = [line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")]
    return dict(
        cpu=names[0] if names else platform.processor(), cores=os.cpu_count(), threads=torch.get_num_threads(),
        torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__, gatekit=gatekit.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
        load=os.getloadavg()[0],  # other jobs on the machine slow the timings down
    )


def markdown_page(results: list[Coverage], arguments: argparse.Namespace, environment: dict, command: str) -> str:
    ok = sum(r.status.startswith("ok") for r in results)
    return f"""# Architecture coverage

Generated by `{command}` on {environment['date'][:10]} ({environment['cpu']}, {environment['cores']} cores,
{environment['threads']} torch thread(s); torch {environment['torch']}, torchvision {environment['torchvision']},
timm {environment['timm']}), in {sum(r.seconds for r in results):.0f} s. Do not edit by hand: rerun the command.
{ok} of {len(results)} rows pass every check. `tests/test_coverage.py` runs the same checks at 32x32 in CI.

Every model is built offline with random weights (norms and layer scales randomized so that no
branch starts as zero) and run at {arguments.size}x{arguments.size}, batch {arguments.batch}:

- **blocks**, **channels gated**: residual blocks found, and the sum of the channel gates' widths;
- **function preserved**: max |gated - original| / max |original|, eval mode, fresh gates (all
  open); passes at most {TOLERANCE};
- **sparse == masked**: max |`gatekit.sparse(gated)` - gated| / max |gated|, eval mode, random
  gates, both batch strategies; passes at most {TOLERANCE}; **MACs run**: the share of the dense MACs those gates run;
- **dense MACs**: gatekit's per-sample count of the original model, and `FlopCounterMode` / 2 on it (batch 1);
- **profile == sparse FLOPs**: `gatekit.profile`'s per-sample MACs equal `FlopCounterMode` / 2 of the
  sparse model run on each sample alone, with the same random gates;
- **full-width fallbacks**: modules in the gated channels' path that sparse execution cannot slice,
  so it runs them on all channels (zeros for the inactive ones) and keeps only the active ones:
  exact, but they save nothing (normalisation layers: no MACs either);
- **finetune**: {arguments.finetune_steps} SGD steps with the sparsity loss in training mode: finite loss, a
  gradient on every gate parameter.

Where the channel gate goes, by family (the rule, from the graph alone, is in
[design.md](design.md#where-the-gates-act); `tests/test_coverage.py` checks each case against the
families' own block classes):

| family | gated layer | through | consumer |
| --- | --- | --- | --- |
| ResNet, Wide ResNet, ResNeXt, ResNet-D, SE-ResNet, RegNet | conv1 | BN, activation | conv2 (grouped in ResNeXt, RegNet) |
| pre-activation ResNetV2 | conv1 | BN + activation | conv2 |
| MobileNetV2/V3, EfficientNet (inverted residual) | 1x1 expansion conv | BN, activation, depthwise conv, BN, activation, squeeze-excitation | 1x1 projection conv |
| the same without expansion (MobileNetV3-Large's first block) | depthwise conv | BN, activation (a squeeze-excitation if any) | 1x1 projection conv |
| ConvNeXt | first pointwise layer (`Linear` on channels-last, or 1x1 conv) | GELU | second pointwise layer |

The SE module's pool reads the masked channels (a closed channel adds 0); its two convs are sliced
with them. ConvNeXt's depthwise 7x7 conv is not gated: the LayerNorm after it mixes channels.

{table(results)}
"""


TIMM_BEGIN, TIMM_END = "<!-- timm-families: generated by benchmarks/coverage.py --timm-families -->", "<!-- /timm-families -->"


def check_timm_family(family: str, model: str, *, size: int = 64, seconds: int = 120) -> _timm_families.FamilyResult:
    """benchmarks/_timm_families.py's checks of one timm model, with this script's helpers."""
    return _timm_families.check_family(family, model, sys.modules[__name__], size=size, seconds=seconds)


def timm_families_section(
    results: list[_timm_families.FamilyResult], size: int, seconds: int, environment: dict, command: str,
    parts: int = 1, missing: list[str] = (),
) -> str:
    failing = [r.family for r in results if r.outcome in ("crash", "checks fail", "refused", "timeout")]
    load = environment.get("load", 0.0)
    busy = f", other jobs on the machine: load average {load:.1f}" if load > environment["threads"] + 0.5 else ""
    resumed = f" (in {parts} runs, each after the first with `--resume`)" if parts > 1 else ""
    partial = (
        f"**Partial run:** {len(missing)} of {len(results) + len(missing)} families not run yet "
        f"({', '.join(missing)}); `--resume` runs them.\n\n" if missing else ""
    )
    return f"""{TIMM_BEGIN}
## timm, one model per architecture family

Generated by `{command}`{resumed} on {environment['date'][:10]} ({environment['cpu']}, {environment['cores']} cores,
{environment['threads']} torch thread(s){busy};
torch {environment['torch']}, timm {environment['timm']}), in
{sum(r.seconds for r in results):.0f} s. One model per family (the name up to its first digit or
variant suffix; the smallest-looking member), random weights (`pretrained=False`), at {size}x{size}, batch 2,
at most {seconds} s each for gatekit's part (convert and the checks; building the model and its reference
forward are timm's and torch's, timed apart). Outcomes: **ok** (converts; open gates keep the function; sparse ==
masked with random gates; the MAC columns say whether gatekit's counts equal `FlopCounterMode` / 2,
attention on its math kernel, docs/macs.md), **no residual block** (no add joins a
convolution branch to its input: transformers, MLPs, plain CNNs), **not traceable** (torch.fx cannot trace
the model: `TraceError`), **input too small** (the original model fails at this size), **checks fail**,
**refused**, **timeout**, **crash** (an exception other than `GatekitError`: a gatekit bug).
`tests/test_coverage.py` runs {', '.join(_timm_families.CI_SAMPLE)} at 32x32 in CI.

{partial}**Totals.** {_timm_families.totals(results)}

**Slowest ten** (gatekit's seconds; the model's own build and forward in brackets): {_slowest(results)}.

**Families that still fail:** {', '.join(failing) or 'none'}.

{_timm_families.table(results)}
{TIMM_END}
"""


def _slowest(results: list[_timm_families.FamilyResult], count: int = 10) -> str:
    slowest = sorted(results, key=lambda r: -r.seconds)[:count]
    return ", ".join(f"{r.model} {r.seconds:.1f} s ({r.model_seconds:.1f} s)" for r in slowest)


def _with_timm_section(page: str, section: str) -> str:
    """``page`` with its timm section replaced by ``section`` (appended if it has none)."""
    if TIMM_BEGIN in page and TIMM_END in page:
        before, rest = page.split(TIMM_BEGIN, 1)
        return before + section.rstrip("\n") + rest.split(TIMM_END, 1)[1]
    return page.rstrip("\n") + "\n\n" + section


def run_timm_families(arguments: argparse.Namespace, command: str) -> None:
    every = _timm_families.representatives(timm.list_models())
    chosen = {family: every[family] for family in arguments.families} if arguments.families else every
    # --resume keeps the rows of the JSON a stopped run left and runs the other families; families
    # named with --families run again and replace their rows.
    kept = _recorded_families(_timm_output(arguments)) if arguments.resume else {}
    if arguments.resume:
        chosen = {f: m for f, m in chosen.items() if arguments.families or f not in kept}
        command, parts = kept.pop("", (command, 0))  # the page shows the command of the whole run
        arguments.parts = parts + 1
    by_family = {f: r for f, r in kept.items() if f not in chosen}
    for family, model in chosen.items():
        result = check_timm_family(family, model, size=arguments.size, seconds=arguments.seconds)
        by_family[family] = result
        print(f"{family} ({model}): {result.outcome} {result.detail} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
        results = [by_family[f] for f in sorted(by_family)]
        _write_timm_families(results, arguments, command, sorted(set(every) - set(by_family)))  # after each family: a stopped run still reports
    results = [by_family[f] for f in sorted(by_family)]
    print(_timm_families.table(results))
    print(_timm_families.totals(results))
    if any(r.outcome == "crash" for r in results):
        sys.exit(1)


def _timm_output(arguments: argparse.Namespace) -> Path:
    return Path(arguments.output or f"benchmarks/results/coverage_timm_families_{machine()['date'][:10]}.json")


def _recorded_families(path: Path) -> dict[str, _timm_families.FamilyResult | str]:
    """The rows of an earlier run's JSON by family, and under the key "" its command and how many
    runs (one and its resumptions) it took."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    rows: dict = {row["family"]: _timm_families.FamilyResult(**row) for row in record["results"]}
    rows[""] = (record["command"], record.get("parts", 1))
    return rows


def _write_timm_families(
    results: list[_timm_families.FamilyResult], arguments: argparse.Namespace, command: str, missing: list[str]
) -> None:
    environment = machine()
    output = _timm_output(arguments)
    output.parent.mkdir(parents=True, exist_ok=True)
    parts = getattr(arguments, "parts", 1)
    record = dict(command=command, parts=parts, machine=environment, results=[asdict(r) for r in results])
    output.write_text(json.dumps(record, indent=1))
    if arguments.markdown:
        page = Path(arguments.markdown)
        existing = page.read_text() if page.exists() else "# Architecture coverage\n"
        section = timm_families_section(results, arguments.size, arguments.seconds, environment, command, parts, missing)
        page.write_text(_with_timm_section(existing, section))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-families", action="store_true",
                        help="one timm model per architecture family instead of --models (benchmarks/_timm_families.py)")
    parser.add_argument("--families", nargs="+", help="with --timm-families: only these families")
    parser.add_argument("--seconds", type=int, default=120, help="with --timm-families: time limit per model")
    parser.add_argument("--resume", action="store_true",
                        help="with --timm-families: keep the families already in --output's JSON, run the others "
                             "(and those named by --families again)")
    parser.add_argument("--models", nargs="+", default=list(MODELS) + list(NO_RESIDUAL), help="model names (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/coverage_<date>.json)")
    parser.add_argument("--markdown", help="also write the page, e.g. docs/coverage.md")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    command = "python benchmarks/coverage.py " + " ".join(sys.argv[1:])
    if arguments.timm_families:
        return run_timm_families(arguments, command.strip())
    results = []
    for name in arguments.models:
        results.append(check(name, size=arguments.size, batch=arguments.batch, finetune_steps=arguments.finetune_steps))
        print(f"{name}: {results[-1].status} ({results[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    print(table(results))
    environment = machine()
    output = Path(arguments.output or f"benchmarks/results/coverage_{environment['date'][:10]}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record = dict(command=command.strip(), machine=environment, results=[asdict(r) for r in results])
    output.write_text(json.dumps(record, indent=1))
    if arguments.markdown:  # the timm section, generated separately, is kept
        page = Path(arguments.markdown)
        section = page.read_text().split(TIMM_BEGIN, 1)[1].split(TIMM_END, 1)[0] if page.exists() and TIMM_BEGIN in page.read_text() else None
        text = markdown_page(results, arguments, environment, command.strip())
        page.write_text(text if section is None else _with_timm_section(text, TIMM_BEGIN + section + TIMM_END + "\n"))
    if not all(r.status.startswith("ok") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
