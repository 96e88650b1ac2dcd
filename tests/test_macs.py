"""MAC counts: exact integers, FlopCounterMode, ptflops, and a brute-force per-sample reference."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from gatekit.dynamic_macs import dynamic_macs
from gatekit.macs import static_macs

IMAGENET = torch.randn(1, 3, 224, 224)


def flop_counter_macs(model, inputs):
    with FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


def test_resnet18_macs():
    model = torchvision.models.resnet18().eval()
    # stem 112*112*64*3*49 = 118,013,952; layer1: 4 convs of 56*56*64*64*9 = 115,605,504;
    # layers 2-4 each: strided conv 57,802,752 + 3 convs of 115,605,504 + downsample 6,422,528
    # = 411,041,792; fc 512*1000 = 512,000.
    expected = 118_013_952 + 4 * 115_605_504 + 3 * 411_041_792 + 512_000
    assert static_macs(model, IMAGENET) == expected == 1_814_073_344
    assert flop_counter_macs(model, IMAGENET) == expected


def test_resnet50_macs():
    model = torchvision.models.resnet50().eval()
    # A bottleneck at width w, s x s output: conv1 s*s*w*4w, conv2 s*s*w*w*9, conv3 s*s*4w*w;
    # after the first block of each stage 51,380,224 + 115,605,504 + 51,380,224 = 218,365,952.
    # First blocks: layer1 231,211,008 (conv1 from 64 channels, downsample 51,380,224);
    # layers 2-4 372,506,624 (conv1 at the input resolution, downsample 102,760,448).
    expected = (
        118_013_952                      # stem
        + 231_211_008 + 2 * 218_365_952  # layer1
        + 372_506_624 + 3 * 218_365_952  # layer2
        + 372_506_624 + 5 * 218_365_952  # layer3
        + 372_506_624 + 2 * 218_365_952  # layer4
        + 2048 * 1000                    # fc
    )
    assert static_macs(model, IMAGENET) == expected == 4_089_184_256
    assert flop_counter_macs(model, IMAGENET) == expected


def test_ptflops_differs_only_by_biases():
    from ptflops import get_model_complexity_info

    model = get_model("cifar/resnet20").eval()
    macs, _ = get_model_complexity_info(
        model, (3, 32, 32), as_strings=False, print_per_layer_stat=False, backend="aten"
    )
    # ptflops' aten backend adds the classifier's 10 bias additions; gatekit counts no biases.
    assert macs == static_macs(model, torch.randn(1, 3, 32, 32)) + 10


def randomize_gates(gated, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for gate in gatekit.gates_of(gated).values():
        for head in (gate.channel_head, gate.layer_head):
            if head is not None:
                head.weight.data = torch.randn(head.weight.shape, generator=generator) * 2
                head.bias.data = torch.randn(head.bias.shape, generator=generator)
        gate.fc.weight.data = torch.randn(gate.fc.weight.shape, generator=generator)


def pruned_forward(model, gates, image):
    """Run one image through an explicitly pruned copy of a CIFAR ResNet: sliced weights, skipped blocks."""
    x = model.relu(model.bn1(model.conv1(image)))
    for block, gate in zip([*model.layer1, *model.layer2, *model.layer3], gates):
        channel_gates, layer_gates = gate(x)
        shortcut = block.shortcut(x)
        if layer_gates is not None and layer_gates[0] == 0:
            x = F.relu(shortcut)
            continue
        active = torch.arange(block.conv1.out_channels) if channel_gates is None else channel_gates[0].nonzero().flatten()
        bn1, bn2 = block.bn1, block.bn2
        if len(active):
            y = F.conv2d(x, block.conv1.weight[active], stride=block.conv1.stride, padding=1)
            y = F.relu(F.batch_norm(y, bn1.running_mean[active], bn1.running_var[active], bn1.weight[active], bn1.bias[active], eps=bn1.eps))
            y = F.conv2d(y, block.conv2.weight[:, active], padding=1)
        else:  # no filter left: conv2 sees only zeros
            size = x.shape[-1] // block.conv1.stride[0]
            y = x.new_zeros(1, block.conv2.out_channels, size, size)
        y = F.batch_norm(y, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, eps=bn2.eps)
        x = F.relu(y + shortcut)
    return model.fc(model.pool(x).flatten(1))


@pytest.mark.parametrize("mode", ["channel+layer", "channel", "layer"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_dynamic_macs_equal_an_explicitly_pruned_network(mode, shortcut):
    model = get_model("cifar/resnet20", shortcut=shortcut).eval()
    gated = gatekit.convert(model, gates=mode, example_input=torch.randn(1, 3, 32, 32)).eval()
    randomize_gates(gated)
    images = torch.randn(6, 3, 32, 32) + 2 * torch.randn(6, 3, 1, 1)  # per-image offsets vary the gates
    outputs = gated(images)
    counted = dynamic_macs(gated)
    gates = list(gatekit.gates_of(gated).values())
    patterns = set()
    for index in range(len(images)):
        with FlopCounterMode(display=False) as counter:
            reference = pruned_forward(model, gates, images[index : index + 1])
        assert counted[index].item() == counter.get_total_flops() // 2
        torch.testing.assert_close(reference[0], outputs[index], atol=1e-4, rtol=1e-4)
        patterns.add(counted[index].item())
    assert len(patterns) > 1, "random gates should give samples of different cost"
    assert counted.max() < gated.gatekit.dense_macs
