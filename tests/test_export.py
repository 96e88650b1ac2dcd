"""Masked gated models export to ONNX and TorchScript and compute there what they compute in PyTorch."""
import collections
import warnings

import pytest
import torch
from torch import nn

import gatekit
from gatekit.export import to_onnx
from toy_models import ToyResNet

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

X = torch.randn(12, 3, 16, 16)


def gated_with_mixed_decisions():
    """Blocks and filters that run for some samples and not others, so the masks matter."""
    gated = gatekit.convert(ToyResNet(), example_input=X[:1])
    for gate in gatekit.gates_of(gated).values():
        nn.init.normal_(gate.channel_head.weight, std=2.0)
        nn.init.normal_(gate.layer_head.weight, std=2.0)
        nn.init.zeros_(gate.channel_head.bias)
        nn.init.zeros_(gate.layer_head.bias)
    gated.train()  # to_onnx exports eval mode and restores this
    with torch.no_grad():
        expected = gated.eval()(X)
    stats = gatekit.gate_stats(gated)
    assert any(0 < s.channel_rate < 1 for s in stats.values())
    return gated.train(), expected


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_runs_in_onnxruntime_with_pytorch_outputs(tmp_path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    gated, expected = gated_with_mixed_decisions()
    path = to_onnx(gated, tmp_path / "gated.onnx", dynamo=dynamo)
    assert gated.training and all(gate.training for gate in gatekit.gates_of(gated).values())
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": X.numpy()})  # 12 samples, exported with 2: dynamic batch
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-5)
    # Masked, not sparse: the graph has no control flow, every conv runs, the gates are multiplications.
    operators = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert operators["If"] == 0 and operators["Loop"] == 0
    assert operators["Conv"] == 5  # stem + 2 convs in each of 2 blocks
    assert operators["Greater"] == 4  # a channel and a layer decision per block


def test_onnx_export_errors_name_the_fix(tmp_path):
    with pytest.raises(gatekit.NotConvertedError, match="gatekit.convert"):
        to_onnx(ToyResNet(), tmp_path / "dense.onnx")
    with pytest.raises(gatekit.GatekitError, match="at least 2 samples"):
        to_onnx(gatekit.convert(ToyResNet(), example_input=X[:1]), tmp_path / "one.onnx", example_input=X[:1],
                dynamo=False)


def test_torchscript_trace_of_the_masked_model_matches_eager(tmp_path):
    gated, expected = gated_with_mixed_decisions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(gated.eval(), X[:2])
    traced.save(str(tmp_path / "gated.pt"))
    loaded = torch.jit.load(str(tmp_path / "gated.pt"))
    torch.testing.assert_close(loaded(X), expected)  # other batch size, same decisions
