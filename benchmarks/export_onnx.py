"""Export gated models to ONNX with both PyTorch exporters; check them in onnxruntime; time the export.

For ResNet20 (3x32x32) and torchvision's resnet18 (3x64x64), gated with heads of random weights so
that filters and blocks close for some inputs and not others, this exports the eval-mode (masked)
model with ``gatekit.export.to_onnx`` (``dynamo=True`` and ``False``), runs 8 inputs in
onnxruntime, and records the export time, the largest output difference to PyTorch, the gates'
channel and execution rates on those inputs, and the graph's operator counts. It also traces each
model with ``torch.jit.trace``, and tries tracing ``gatekit.sparse`` of it.

Usage (from the repository root; needs the export extra)::

    python benchmarks/export_onnx.py     # about 2 minutes on 2 busy CPU cores
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import gatekit
from gatekit.adapters import get_model
from gatekit.export import to_onnx

MODELS = {"resnet20": ("cifar/resnet20", (3, 32, 32)), "resnet18": ("torchvision/resnet18", (3, 64, 64))}
RESULTS = Path(__file__).parent / "results"


def gated_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    gated = gatekit.convert(get_model(name), example_input=torch.randn(1, *shape)).eval()
    for gate in gatekit.gates_of(gated).values():
        for head in (gate.channel_head, gate.layer_head):
            nn.init.normal_(head.weight, std=2.0)
            nn.init.constant_(head.bias, 0.5)
    return gated


def check(name: str, shape: tuple[int, ...], folder: str) -> dict:
    gated = gated_model(MODELS[name][0], shape)
    images = torch.randn(8, *shape)
    with torch.no_grad():
        expected = gated(images).numpy()
    row = {"model": name, **{key: round(v, 3) for key, v in gatekit.summarize(gatekit.gate_stats(gated)).items()}}
    for dynamo in (True, False):
        path = os.path.join(folder, f"{name}-{dynamo}.onnx")
        start = time.perf_counter()
        to_onnx(gated, path, dynamo=dynamo)
        seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {"input": images.numpy()})
        graph = onnx.load(path)
        operators = collections.Counter(node.op_type for node in graph.graph.node)
        row["dynamo" if dynamo else "torchscript"] = dict(
            export_seconds=round(seconds, 2), max_abs_difference=float(np.abs(output - expected).max()),
            opset=max(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")),
            operators=dict(sorted(operators.items())),
        )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(gated, images[:2])
        row["jit_trace_max_abs_difference"] = float((traced(images) - gated(images)).abs().max())
        row["jit_trace_sparse"] = _trace_sparse(gated, images)
    return row


def _trace_sparse(gated: nn.Module, images: torch.Tensor) -> str:
    fast = gatekit.sparse(gated)
    try:
        traced = torch.jit.trace(fast, images[:1])
    except Exception as error:  # recorded, not raised: the question is whether it works
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    difference = float((traced(images) - fast(images)).abs().max())
    return f"traces; on 8 other inputs the traced model differs from sparse by up to {difference:.3g}"


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = [check(name, shape, folder) for name, (_, shape) in MODELS.items()]
    for row in rows:
        print(json.dumps(row))
    result = dict(date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]),
                  machine=dict(cpu=_cpu(), threads=1, load_average=os.getloadavg()),
                  versions=dict(torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__),
                  rows=rows)
    output = RESULTS / f"export_onnx_{result['date']}.json"
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
