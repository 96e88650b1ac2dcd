"""Without an optional dependency, gatekit says which extra to install (and `import gatekit` never needs one)."""
import importlib
import subprocess
import sys

import pytest
import torch

import gatekit
from toy_models import ToyResNet


def hide(monkeypatch, *modules):
    for module in modules:  # a None entry makes `import module` raise ImportError
        monkeypatch.setitem(sys.modules, module, None)


def test_lightning_integration_names_the_extra(monkeypatch):
    hide(monkeypatch, "lightning", "lightning.pytorch", "pytorch_lightning")
    monkeypatch.delitem(sys.modules, "gatekit.integrations.lightning", raising=False)
    with pytest.raises(gatekit.errors.MissingDependencyError, match=r"gatekit\[lightning\]") as error:
        importlib.import_module("gatekit.integrations.lightning")
    assert isinstance(error.value, ImportError)  # what `except ImportError` around optional imports expects


def test_tensorboard_writer_names_the_extra(monkeypatch):
    from gatekit.logging import TensorBoardWriter

    hide(monkeypatch, "torch.utils.tensorboard")
    with pytest.raises(gatekit.errors.MissingDependencyError, match=r"gatekit\[tensorboard\]"):
        TensorBoardWriter("unused")


@pytest.mark.parametrize("dynamo, package", [(True, "onnxscript"), (False, "onnx")])
def test_onnx_export_names_the_extra(monkeypatch, tmp_path, dynamo, package):
    from gatekit.export import to_onnx

    hide(monkeypatch, package)
    gated = gatekit.convert(ToyResNet(), example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(gatekit.errors.MissingDependencyError, match=rf"{package}.*gatekit\[export\]"):
        to_onnx(gated, tmp_path / "model.onnx", dynamo=dynamo)


def test_import_gatekit_loads_no_optional_dependency():
    code = ("import sys, gatekit, gatekit.logging, gatekit.export; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'onnx', 'onnxscript', 'onnxruntime', "
            "'tensorboard', 'mkdocs') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert loaded == "[]"
