"""The torch.fx tracer gatekit uses, and the registry of modules and functions it must not enter.

Model families add tracing hints with :func:`register_tracing_hints` (the timm adapter hands over
timm's own ``register_notrace_module`` list this way); users add their own per call through
``gatekit.convert(model, leaf_modules=..., autowrap_functions=...)``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx
from torch import nn

from .adapters import load_adapters
from .errors import TraceError
from .gate import Gate

TracingHints = tuple[Iterable[type[nn.Module]], Iterable[Callable[..., Any]]]
_hint_providers: list[Callable[[], TracingHints]] = []


def register_tracing_hints(provider: Callable[[], TracingHints]) -> Callable[[], TracingHints]:
    """Register a callable returning ``(leaf_module_types, autowrap_functions)``, asked at every trace.

    A provider rather than fixed lists, so that libraries which register leaf modules lazily
    (timm does, as its model files are imported) are asked at trace time.
    """
    _hint_providers.append(provider)
    return provider


class GatekitTracer(fx.Tracer):
    """An fx tracer that keeps registered leaf modules whole and remembers where tracing failed."""

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module]] = (),
        autowrap_functions: Sequence[Callable[..., Any]] = (),
    ) -> None:
        leaves, functions = set(leaf_modules), set(autowrap_functions)
        for provider in _hint_providers:
            provider_leaves, provider_functions = provider()
            leaves.update(provider_leaves)
            functions.update(provider_functions)
        super().__init__(autowrap_functions=tuple(functions))
        self.leaf_modules = tuple(leaves)
        self.failed_in: str | None = None

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_modules and isinstance(module, self.leaf_modules):
            return True
        return super().is_leaf_module(module, module_qualified_name)

    def call_module(self, module: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            # The innermost module is the first to see the exception: keep its name.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(module)
            raise


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    class_name: str | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose call_module targets are dotted module paths.

    Raises:
        TraceError: torch.fx cannot trace the model; the message names the module that failed.
    """
    tracer = GatekitTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model, concrete_args=_optional_arguments(model) or None)
    except Exception as error:
        where = tracer.failed_in
        module_type = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        location = f"module '{where}' ({module_type})" if where else f"the forward of {module_type}"
        raise TraceError(
            f"torch.fx cannot trace {location}: {type(error).__name__}: {error}\n"
            f"Hint: if that module has data-dependent control flow, keep it whole with "
            f"`gatekit.convert(model, leaf_modules=[{module_type}])`; wrap a failing free function "
            f"with `autowrap_functions=[fn]`. A module kept whole cannot contain a residual block."
        ) from error
    return fx.GraphModule(tracer.root, graph, class_name or type(model).__name__)


def _optional_arguments(model: nn.Module) -> dict[str, None]:
    """The forward's parameters after the first that default to None (timm's Hiera: ``mask=None``).
    Traced as placeholders, ``if mask is not None`` would take the branch the model never takes when
    called with one input; fixed to None, the graph is the one-input forward."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a signature: trace it as it is
        return {}
    return {p.name: None for p in parameters
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace_model(
    model: nn.Module,
    leaf_modules: Sequence[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    class_name: str | None = None,
) -> fx.GraphModule:
    """:func:`trace` with every adapter's tracing hints, keeping gates whole (a gated model traces too).

    Raises:
        TraceError: torch.fx cannot trace the model; the message names the module that failed.
    """
    load_adapters()
    return trace(
        model, leaf_modules=tuple(leaf_modules) + (Gate,), autowrap_functions=autowrap_functions,
        class_name=class_name,
    )
