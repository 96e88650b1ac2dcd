"""ONNX export of a gated model, or one with exits, in masked mode: every branch computed, gate
decisions applied as 0/1 factors, exits chosen by a selection among the heads' logits.

The exported graph has no control flow: each gate's decision is a ``Greater`` and a ``Cast`` of its
logits, multiplied into the branch it gates; each sample's output is the logits of the first exit
confident enough. Any ONNX runtime runs it and gets the PyTorch outputs, but a closed block or filter
costs as much as an open one, and a sample that left early still runs the whole network.
docs/export.md says what sparse execution would need from a runtime.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from .errors import GatekitError, MissingDependencyError
from ._exit_info import exits_of, has_exits
from .gated_model import info_of


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_input: Tensor | None = None,
    dynamo: bool = True,
    opset_version: int | None = None,
) -> str:
    """Export a gated model or one with exits, in eval mode, to an ONNX file with a dynamic batch dimension.

    Args:
        model: a model from :func:`gatekit.convert` or :func:`gatekit.add_exits` (or :func:`gatekit.load`).
            It is exported in eval mode (deterministic gates, exits at their thresholds); its own
            mode is restored afterwards.
        path: the ``.onnx`` file to write.
        example_input: an input batch; by default random normal inputs of the conversion's input
            shape, two samples so the batch size stays symbolic.
        dynamo: True for ``torch.export``-based export (PyTorch's default since 2.9; a graph without
            shape arithmetic, needs ``onnxscript``), False for the TorchScript-based exporter
            (deprecated by PyTorch, but 10-30 times faster to export).
        opset_version: ONNX opset; PyTorch's default if None.

    Returns:
        ``path``, as a string. The graph's input is named ``"input"``, its (first) output ``"output"``.

    Raises:
        NotConvertedError: the model has neither gates nor exits.
        MissingDependencyError: ``onnx`` (or, with ``dynamo=True``, ``onnxscript``) is not installed.
        GatekitError: ``example_input`` holds a single sample (the batch size would be fixed at 1), or
            ``dynamo=False`` for a model with exits.

    >>> to_onnx(gated, "gated.onnx")  # doctest: +SKIP
    'gated.onnx'
    >>> onnxruntime.InferenceSession("gated.onnx").run(None, {"input": images.numpy()})  # doctest: +SKIP
    """
    input_shape = exits_of(model).input_shape if has_exits(model) else info_of(model).input_shape
    if has_exits(model) and not dynamo:
        # The TorchScript-based exporter loses the spatial sizes in an fx graph and cannot export
        # the heads' adaptive pooling ("input size not accessible").
        raise GatekitError("a model with exits exports with the dynamo exporter only: call to_onnx(..., dynamo=True).")
    _require("onnxscript" if dynamo else "onnx")
    if example_input is None:
        parameter = next(model.parameters())
        example_input = torch.randn((2, *input_shape[1:]), device=parameter.device, dtype=parameter.dtype)
    if example_input.shape[0] < 2:
        raise GatekitError("to_onnx needs an example_input of at least 2 samples, or the batch size is fixed at 1.")
    path = os.fspath(path)
    # Output names are needed too: without them the TorchScript-based exporter mistakes an fx
    # GraphModule's ``graph`` for a TorchScript graph and fails.
    options: dict = {"dynamo": dynamo, "input_names": ["input"], "output_names": ["output"],
                     "opset_version": opset_version}
    if dynamo:
        options.update(dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    else:
        options.update(dynamic_axes={"input": {0: "batch"}})
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with warnings.catch_warnings():
            # The gates keep their last decisions as attributes, for losses and statistics; export
            # warns about each such assignment, and they do not end up in the graph.
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # gate reshapes
            torch.onnx.export(model, (example_input,), path, **options)
    finally:
        for module, training in modes.items():
            module.training = training
    return path


def _require(package: str) -> None:
    try:
        __import__(package)
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export needs the {package} package: `pip install 'gatekit[export]'`."
        ) from error
