"""Every MAC counted (issue 23): convolutions inside leaf modules, matmuls, bmm, baddbmm, einsum and
scaled-dot-product attention, dense and per sample, pinned as exact integers and checked against
FlopCounterMode / 2 (attention on its math kernel: FlopCounterMode has no formula for the fused CPU
kernel and counts it as 0, docs/macs.md)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit._shapes import propagate_shapes
from gatekit._tracing import trace_model
from gatekit.macs import node_macs, static_macs
from test_coverage import coverage  # benchmarks/coverage.py, loaded once
from test_fuzz import force_gates

SMALL = torch.randn(1, 3, 64, 64)


def flop_counter_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


def macs_by_node(model: nn.Module, inputs: torch.Tensor, **tracing) -> dict[str, int]:
    graph_module = trace_model(model, **tracing)
    propagate_shapes(graph_module, model, inputs)
    return {node.name: macs for node, macs in node_macs(graph_module).items()}


class Products(nn.Module):
    """One of each product gatekit reads off the graph, on a [B, 4, 6] input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.table = nn.Parameter(torch.randn(7, 3))
        self.mix = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        a = x @ self.weight                                     # matmul [B,4,6] x [6,5]
        b = torch.bmm(a, a.transpose(1, 2))                     # bmm [B,4,5] x [B,5,4]
        c = torch.baddbmm(b, b, b)                              # baddbmm [B,4,4] x [B,4,4]
        d = torch.einsum("bij,bjk,bkl->bil", c, a, a.transpose(1, 2))  # measured as torch runs it
        q = a.unsqueeze(1)                                      # [B,1,4,5]
        e = F.scaled_dot_product_attention(q, q, q[..., :3])    # [B,1,4,5] x 4 keys, Ev = 3
        bias = self.table @ self.mix                            # reads no input: once per forward
        return d.sum() + e.sum() + bias.sum()


def test_each_product_counts_its_output_times_the_contracted_size():
    model, x = Products(), torch.randn(1, 4, 6)
    macs = macs_by_node(model, x)
    assert macs["matmul"] == 4 * 5 * 6 == 120
    assert macs["bmm"] == 4 * 4 * 5 == 80
    assert macs["baddbmm"] == 4 * 4 * 4 == 64
    # torch contracts left to right: (c @ a) [4,4]x[4,5] = 80, then [4,5]x[5,4] = 80.
    assert macs["einsum"] == 80 + 80
    # q @ k.T: 4 x 4 x 5 = 80; weights @ v: 4 x 4 x 3 = 48 -> 1 x 1 x 4 x 4 x (5 + 3).
    assert macs["scaled_dot_product_attention"] == 128
    assert macs["matmul_1"] == 7 * 2 * 3 == 42
    assert sum(macs.values()) == 120 + 80 + 64 + 160 + 128 + 42 == flop_counter_macs(model, x)


def test_per_sample_counts_do_not_depend_on_the_batch_and_parameter_products_count_once():
    model = Products()
    single, batch = static_macs(model, torch.randn(1, 4, 6)), static_macs(model, torch.randn(5, 4, 6))
    assert single == batch == 594
    # Run alone, each sample pays the parameter-only product once, as at batch 1.
    assert flop_counter_macs(model, torch.randn(5, 4, 6)) == 5 * (594 - 42) + 42


class Blurred(nn.Module):
    """A conv inside a module fx keeps whole (``leaf_modules``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blur = nn.Sequential(nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, bias=False))
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.blur(x))


def test_convolutions_inside_a_users_leaf_module_and_transposed_convolutions_count():
    model, x = Blurred(), torch.randn(1, 3, 8, 8)
    macs = macs_by_node(model, x, leaf_modules=[nn.Sequential])
    # The depthwise blur: 3 x 4 x 4 outputs x 1 input channel x 9 = 432.
    # The transposed conv spreads each of its 3 x 4 x 4 inputs over 2 channels x 4 taps: 384.
    assert macs == {"blur": 432, "up": 384}
    assert 432 + 384 == flop_counter_macs(model, x)


def test_blur_pool_resnet_counts_the_blur_convolutions_inside_timms_leaf_module():
    model = timm.create_model("resnetblur18").eval()
    macs = macs_by_node(model, SMALL)
    blur = {name: count for name, count in macs.items() if name.endswith("aa") or name == "maxpool_1"}
    # BlurPool2d: a fixed 3x3 depthwise filter at stride 2, channels x output pixels x 9: after the
    # stem's max pool 64 x 16 x 16, in the first blocks of layers 2-4 128 x 8 x 8, 256 x 4 x 4, 512 x 2 x 2.
    assert blur == {"maxpool_1": 147_456, "layer2_0_aa": 73_728, "layer3_0_aa": 36_864, "layer4_0_aa": 18_432}
    # Conv and linear layers 191,025,152 (what gatekit counted before), blur 276,480.
    assert sum(macs.values()) == 191_025_152 + 276_480 == 191_301_632 == flop_counter_macs(model, SMALL)


def test_global_context_resnet_counts_its_attention_pooling_matmuls():
    model = timm.create_model("gcresnet33ts").eval()
    macs = macs_by_node(model, SMALL)
    pooling = sum(count for name, count in macs.items() if name.startswith("matmul"))
    # Each global-context block pools C channels over H x W positions: [C, HW] x [HW, 1].
    # Stage 1: 2 x 64 x 16 x 16; stage 2: 3 x 128 x 8 x 8; stage 3: 3 x 384 x 4 x 4; stage 4: 2 x 384 x 2 x 2.
    assert pooling == 2 * 16_384 + 3 * 8_192 + 3 * 6_144 + 2 * 1_536 == 78_848
    assert sum(macs.values()) == 297_264_128 + 78_848 == 297_342_976 == flop_counter_macs(model, SMALL)


def test_sk_resnet_counts_both_kernel_paths_and_its_attention():
    model = timm.create_model("skresnet18").eval()
    gated = gatekit.convert(model, example_input=SMALL)
    site = next(s for s in gated.gatekit.sites if s.name == "layer1.0")
    # layer1.0: two 3x3 paths, each reading half of the 64 input channels, 64 x 16 x 16 x 32 x 9
    # = 4,718,592; the kernel attention 64 -> 16 (1,024) and 16 -> 2 x 64 (2,048); conv2 64 x 16 x 16 x 64 x 9.
    assert site.branch_macs == 2 * 4_718_592 + 1_024 + 2_048 + 9_437_184 == 18_877_440
    # Stem 7x7 64 x 32 x 32 x 3 x 49 = 9,633,792; blocks layer1 2 x 18,877,440, layer2 14,686,208 +
    # 18,880,512, layer3 14,704,640 + 18,898,944, layer4 14,778,368 + 18,972,672; fc 512 x 1000.
    expected = 9_633_792 + 2 * 18_877_440 + 33_566_720 + 33_603_584 + 33_751_040 + 512_000
    assert gated.gatekit.dense_macs == expected == 148_822_016 == flop_counter_macs(model, SMALL)


def test_attention_hybrid_counts_its_attention():
    model = timm.create_model("pvt_v2_b0").eval()
    macs = macs_by_node(model, SMALL)
    attention = sum(count for name, count in macs.items() if name.startswith("scaled_dot_product_attention"))
    # Two blocks per stage, batch x heads x queries x keys (spatially reduced to 2 x 2) x (E + Ev):
    # 1 x 256 x 4 x 64, 2 x 64 x 4 x 64, 5 x 16 x 4 x 64, 8 x 4 x 4 x 64.
    assert attention == 2 * (65_536 + 32_768 + 20_480 + 8_192) == 253_952
    assert sum(macs.values()) == 43_333_632 + 253_952 == 43_587_584 == flop_counter_macs(model, SMALL)


class AttentionBlocks(nn.Module):
    """Residual blocks whose branches hold a leaf module with a conv, a matmul and attention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.leaf = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(self.leaf(torch.relu(self.conv1(x))))
        tokens = self.proj(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, HW, 8]
        mixed = F.scaled_dot_product_attention(tokens, tokens, tokens) @ torch.ones(8, 8)
        x = x + mixed.squeeze(1).transpose(1, 2).reshape(x.shape)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("forcings", [["closed", "open"], ["open", "closed"], ["some_channels"], ["per_sample"]])
def test_dynamic_macs_count_leaf_modules_and_matmuls_where_a_gate_skips_them(forcings):
    torch.manual_seed(0)
    model = AttentionBlocks().eval()
    images = torch.randn(3, 2, 6, 6)
    gated = gatekit.convert(model, example_input=images[:1], leaf_modules=[nn.Sequential]).eval()
    assert [site.name for site in gated.gatekit.sites] == ["add", "add_1"]
    force_gates(gated, forcings, seed=1)
    fast = gatekit.sparse(gated)
    with torch.no_grad():
        for image in images.split(1):
            torch.testing.assert_close(fast(image), gated(image), atol=1e-5, rtol=1e-5)
            assert gatekit.dynamic_macs(gated).item() == flop_counter_macs(fast, image)


@pytest.mark.parametrize("family", ["skresnet", "gcresnet", "resnetblur", "cpubone"])
def test_timm_families_count_every_mac_dense_and_per_sample(family):
    """The coverage check on the issue's families: dense MACs and each sample's dynamic MACs (random
    gates) equal FlopCounterMode / 2 of the original and of the sparse model."""
    name = coverage._timm_families.representatives(timm.list_models(pretrained=False))[family]
    result = coverage.check_timm_family(family, name, size=64)
    assert result.outcome == "ok", result
    assert result.dense_macs_equal and result.dynamic_macs_equal
