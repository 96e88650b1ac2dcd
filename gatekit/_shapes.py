"""Shape propagation of a traced model on an example input, with errors that name the failing node."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from ._source import SOURCE_ATTRIBUTE
from .adapters import model_entry
from ._op_macs import counting
from .errors import GatekitError, NoResidualBlockError
from .gate import Gate


def propagate_shapes(
    graph_module: fx.GraphModule, model: nn.Module, example_input: Tensor | None, *, fake: bool = False
) -> Tensor:
    """Run the example input through the graph once, recording every node's shape in node.meta.

    ``fake``: first try on fake tensors, which carry shapes and no data (a 1B-parameter transformer
    at 224x224: about 1 s instead of 14), where every module the graph calls is torch's own; on real
    tensors otherwise, and where the model needs real values (data-dependent shapes).

    Returns the example input used. Raises GatekitError naming the node that failed.
    """
    if example_input is None:
        example_input = _default_example_input(model)
    elif not isinstance(example_input, Tensor):
        raise GatekitError(f"example_input must be a tensor, got {type(example_input).__name__}.")
    modes = {module: module.training for module in graph_module.modules()}
    # Eval mode: batch-norm statistics must not move, and a batch of one must be accepted.
    graph_module.eval()
    try:
        if fake and _propagated_on_fake_tensors(graph_module, example_input):
            return example_input
        propagation = _ShapeProp(graph_module)
        with torch.no_grad():
            propagation.propagate(example_input)
    except Exception as error:
        cause = error.__cause__ or error  # ShapeProp re-raises with the whole node dump
        raise GatekitError(
            f"{type(model).__name__} failed at '{propagation.current}' on an example input of shape "
            f"{tuple(example_input.shape)}: {type(cause).__name__}: {cause}\n"
            f"Hint: {_input_hint(model, example_input)}"
        ) from error
    finally:
        for module, training in modes.items():
            module.training = training
    return example_input


def _propagated_on_fake_tensors(graph_module: fx.GraphModule, example_input: Tensor) -> bool:
    """Whether shape propagation on a fake input went through. The graph runs on the model's own
    (real) weights without copying them, so only graphs whose modules are all torch's own, which keep
    no state, run this way; where it fails, the real run overwrites what it left."""
    if not all(_torch_own(graph_module.get_submodule(node.target))
               for node in graph_module.graph.nodes if node.op == "call_module"):
        return False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.no_grad(), mode:
            _ShapeProp(graph_module).propagate(mode.from_tensor(example_input))
    except Exception:  # noqa: BLE001  (whatever the fake run missed, the real run reports or handles)
        return False
    return True


def _torch_own(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _input_hint(model: nn.Module, example_input: Tensor) -> str:
    weight = next(iter(model.parameters()), None)
    if weight is not None and (weight.dtype, weight.device) != (example_input.dtype, example_input.device):
        return (
            f"the model's parameters are {weight.dtype} on {weight.device}, the example input "
            f"{example_input.dtype} on {example_input.device}: pass `example_input=` in the model's "
            f"dtype and device (`x.to(next(model.parameters()))`)."
        )
    return "pass `example_input=` a tensor the model accepts."


# Where the graph does not show the MACs, they are measured as the call runs (gatekit/macs.py).
MEASURED_MACS = "gatekit_macs"
# torch's own layers without MACs are not measured (it costs a few hundred µs a call); these have some.
_TORCH_LAYERS_WITH_MACS = (nn.RNNBase, nn.Bilinear)


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers which node it ran last, to name it when one fails, and measures the
    MACs of leaf modules and einsums (``node.meta["gatekit_macs"]``, for the whole example batch)."""

    current = "the input"

    def run_node(self, node: fx.Node) -> Any:
        self.current = node.target if node.op == "call_module" else node.name
        if not self._measured(node):
            return super().run_node(node)
        with counting() as counter:
            result = super().run_node(node)
        node.meta[MEASURED_MACS] = counter.macs
        return result

    def _measured(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target is torch.einsum
        if node.op != "call_module":
            return False
        module = self.fetch_attr(node.target)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, Gate)):
            return False  # conv and linear layers: counted from their shapes; a gate's MACs are its own
        plain = _torch_own(module) and not any(True for _ in module.children())
        return not plain or isinstance(module, _TORCH_LAYERS_WITH_MACS)


def _default_example_input(model: nn.Module) -> Tensor:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first_conv is None:
        raise NoResidualBlockError(
            f"{type(model).__name__} has no convolution, so it has no residual block to gate."
        )
    weight = first_conv.weight
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    if source is not None:  # built by gatekit.adapters.get_model: measure at its registered input size
        size = model_entry(source[0]).input_size
        if size[0] == first_conv.in_channels:
            return torch.randn(1, *size, device=weight.device, dtype=weight.dtype)
    spatial = (224,) * len(first_conv.kernel_size)
    return torch.randn(1, first_conv.in_channels, *spatial, device=weight.device, dtype=weight.dtype)
