"""Model-family glue: build models by name and give torch.fx the hints each family needs.

Installed as ``gatekit.adapters``. Third-party packages add families through the
``gatekit.adapters`` entry-point group, whose entries are modules that call :func:`register_model`.
"""
from ._registry import ENTRY_POINT_GROUP, ModelEntry, example_input, get_model, list_models, load_adapters, model_entry, register_model

__all__ = [
    "ENTRY_POINT_GROUP", "ModelEntry", "example_input", "get_model", "list_models", "load_adapters",
    "model_entry", "register_model",
]
