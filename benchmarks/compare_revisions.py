"""Time this checkout's masked and sparse models against another git revision's, in one process.

The machine this project is measured on is shared: the same code timed ten minutes apart can move by
0.05 in sparse / static, more than most changes it is meant to judge. Two revisions are compared
fairly only side by side. This script copies the other revision's ``gatekit`` package into a
temporary folder as ``gatekit_<hash>`` (its C gate kernel compiled there with the compiler Python
was built with), builds every variant with both packages from the same dense model, and times them
interleaved (benchmarks/_timing.py):

- ``masked``: the gated model in eval mode, every gate open, over the dense model;
- ``sparse``: at each level of benchmarks/sparse_speed.py (forced decisions), over the static model
  of the same MACs;
- and for each, this checkout over the other revision: medians of within-repeat ratios.

The other revision's adapters are not loaded (the installed entry points name this checkout's), so
it lacks their tracing hints; the models of sparse_speed.py need none.

Usage (repository root)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/compare_revisions.py c0c9a04   # about 2 minutes
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import torch

import gatekit
import sparse_speed
from _timing import paired_ratio, time_interleaved
from gatekit.adapters import get_model

ROOT = Path(__file__).parent.parent


def load_revision(revision: str, folder: Path) -> ModuleType:
    """``revision``'s gatekit package, imported as ``gatekit_<hash>`` from ``folder``."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    name = f"gatekit_{commit}"
    archive = subprocess.run(["git", "archive", commit, "gatekit", "adapters"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / name
    (folder / "gatekit").rename(package)
    (folder / "adapters").rename(package / "adapters")  # installed as gatekit.adapters (pyproject.toml)
    for path in package.rglob("*.py"):  # its own absolute imports must find its own modules
        text = path.read_text()
        text = text.replace("from gatekit.", f"from {name}.").replace("import gatekit\n", f"import {name} as gatekit\n")
        path.write_text(text)
    source = package / "_gate_kernel.c"
    if source.exists():
        compiler = (sysconfig.get_config_var("CC") or "cc").split()
        target = package / f"_gate_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
        subprocess.run([*compiler, "-O3", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source),
                        "-o", str(target)], check=True)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def build(package: ModuleType, model: torch.nn.Module, levels: list[float], images: torch.Tensor) -> dict:
    """The masked model (gates open) and, per level, the sparse and static models, made by ``package``."""
    sparse_speed.gatekit = package  # prepare() converts and makes sparse through this name
    try:
        models = {"masked": package.convert(model, example_input=images[:1]).eval()}
        for level in levels:
            case = sparse_speed.prepare(model, level, images)["models"]
            models.update({f"sparse@{level}": case["sparse"], f"static@{level}": case["static"]})
    finally:
        sparse_speed.gatekit = gatekit
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="the git revision to compare this checkout with")
    parser.add_argument("--model", default="resnet20", choices=list(sparse_speed.MODELS))
    parser.add_argument("--levels", type=float, nargs="+", default=[0.75, 0.5], choices=sparse_speed.LEVELS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=101)
    parser.add_argument("--output", type=Path,
                        help="JSON path (default: benchmarks/results/compare_revisions_<date>.json)")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    torch.set_num_threads(1)
    model_name, shape = sparse_speed.MODELS[args.model]
    model = get_model(model_name).eval()
    images = sparse_speed.group_images(shape)
    inputs = sparse_speed.batch_of(images, args.batch)
    with tempfile.TemporaryDirectory() as folder:
        other = load_revision(args.revision, Path(folder))
        this, that = build(gatekit, model, args.levels, images), build(other, model, args.levels, images)
    variants = {"dense": model, **{f"{key} (this)": m for key, m in this.items()},
                **{f"{key} (other)": m for key, m in that.items() if not key.startswith("static")}}
    with torch.inference_mode():
        calls = {key: (lambda module=module: module(inputs)) for key, module in variants.items()}
        for call in calls.values():
            call()
        times = time_interleaved(calls, args.repeats, loops=max(1, 30 // args.batch))
    rows = []
    for key in ["masked"] + [f"sparse@{level}" for level in args.levels]:
        reference = "dense" if key == "masked" else f"static@{key.split('@')[1]} (this)"
        this_time, other_time = times[f"{key} (this)"], times[f"{key} (other)"]
        rows.append(dict(
            variant=key, reference=reference.removesuffix(" (this)"), this_ms=1e3 * statistics.median(this_time),
            other_ms=1e3 * statistics.median(other_time), this_over_reference=paired_ratio(this_time, times[reference]),
            other_over_reference=paired_ratio(other_time, times[reference]),
            this_over_other=paired_ratio(this_time, other_time),
        ))
        row = rows[-1]
        print(f"{key:<12} / {row['reference']:<12} this {row['this_over_reference']:.3f}  other "
              f"{row['other_over_reference']:.3f}  this / other {row['this_over_other']:.3f}")
    this_commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip()
    result = dict(this=this_commit, other=args.revision, model=args.model, batch=args.batch, repeats=args.repeats,
                  started=started, rows=rows)
    day = datetime.date.today().isoformat()
    output = args.output or Path(__file__).parent / "results" / f"compare_revisions_{day}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
