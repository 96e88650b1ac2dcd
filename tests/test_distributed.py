"""Distributed finetuning: a 2-process DDP run (torchrun, gloo, CPU) of examples/ddp_finetune.py, with
distillation from the model before gating, equals a single process on the same global batches, and
what DDP needs from a gated model.

Exactness: the single process splits every global batch into the same two halves, draws each half's
gate noise with the seed that process used, and accumulates the halves' gradients (loss / 2 each):
what DDP computes. The per-step rates then agree exactly and the weights up to float rounding. The
sparsity loss is a function of each process's own batch means (like batch norm statistics), so a run
on the whole global batch at once differs slightly; docs/distributed.md gives the numbers.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gatekit
from gatekit.adapters import get_model
from test_macs import randomize_gates
from test_sparse import randomize_norms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import ddp_finetune  # noqa: E402

ARGUMENTS = ["--model", "cifar/resnet8", "--channels", "3", "--size", "16", "--batch-size", "16", "--steps", "4",
             "--lr", "0.1", "--layer", "0.3", "--channel", "0.3", "--kd", "0.5", "--print-every", "2"]


def single_process_reference(arguments, world):
    """examples/ddp_finetune.py's training, in one process: each global batch in ``world`` shares."""
    args = ddp_finetune.parse(arguments)
    torch.manual_seed(args.seed)
    images, labels = ddp_finetune.global_batches(args)
    model = get_model(args.model)
    gated = gatekit.convert(model, example_input=images[:1],
                            regularizer=gatekit.SparsityLoss(layer=args.layer, channel=args.channel))
    distill = gatekit.DistillationLoss(model.eval(), weight=args.kd)
    optimizer = torch.optim.SGD(gatekit.param_groups(gated), lr=args.lr, momentum=0.9, nesterov=True)
    local, history = args.batch_size // world, []
    for step in range(args.steps):
        optimizer.zero_grad()
        shares = []
        for rank in range(world):
            start = step * args.batch_size + rank * local
            torch.manual_seed(ddp_finetune.gate_noise_seed(args.seed, step, rank, world))
            output = gated(images[start : start + local])
            loss = nn.functional.cross_entropy(output, labels[start : start + local]) + gatekit.gate_loss(gated)
            loss = loss + distill(output, images[start : start + local])
            (loss / world).backward()  # DDP averages the processes' gradients
            shares.append(gatekit.gate_stats(gated))
        optimizer.step()
        history.append({name: gatekit.BlockStats(*(sum(getattr(s[name], f) for s in shares) / world
                                                   for f in ("execution_rate", "channel_rate")))
                        for name in shares[0]})
    return history, gated


def failure_report(result: subprocess.CompletedProcess, logs: Path) -> str:
    """torchrun's exit status and output, then every child's own stderr (where a C++ abort says why)."""
    parts = [f"torchrun exited with {result.returncode}", "--- stdout", result.stdout[-2000:],
             "--- stderr", result.stderr[-3000:]]
    for path in sorted(logs.rglob("stderr.log")):
        parts += [f"--- {path.relative_to(logs)}", path.read_text(errors="replace")[-3000:]]
    return "\n".join(parts)


def test_two_process_ddp_finetune_equals_the_single_process_run(tmp_path):
    saved = tmp_path / "ddp.pt"
    logs = tmp_path / "logs"
    # --tee keeps each process's own stdout and stderr in logs/, so a failure shows why a child died.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--tee", "3",
               str(ROOT / "examples" / "ddp_finetune.py"), *ARGUMENTS, "--save", str(saved)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT)
    assert result.returncode == 0, failure_report(result, logs)
    assert "step 4:" in result.stdout
    ddp = torch.load(saved, weights_only=False)
    assert ddp["world"] == 2

    history, reference = single_process_reference(ARGUMENTS, world=2)
    assert ddp["rates"] == history
    first, last = gatekit.summarize(history[0]), gatekit.summarize(history[-1])
    assert last["execution_rate"] < first["execution_rate"], "the sparsity loss closed gates"
    parameters = dict(reference.named_parameters())  # buffers: DDP keeps rank 0's running statistics
    for name, parameter in parameters.items():
        torch.testing.assert_close(ddp["state_dict"][name], parameter.detach(), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["channel+layer", "channel", "layer"])
def test_every_parameter_gets_a_gradient_even_with_every_gate_closed(mode):
    """Why DDP's default find_unused_parameters=False is right: a closed gate multiplies by 0 and
    keeps the gradient path (straight-through), so no parameter ever sits out a step."""
    gated = gatekit.convert(get_model("cifar/resnet8"), gates=mode, example_input=torch.randn(1, 3, 16, 16),
                            regularizer=gatekit.SparsityLoss(layer=0.1, channel=0.1)).train()
    for gate in gatekit.gates_of(gated).values():
        for head in (gate.channel_head, gate.layer_head):
            if head is not None:
                nn.init.constant_(head.bias, -50.0)
    output = gated(torch.randn(4, 3, 16, 16))
    closed = 0.0 if "layer" in mode else 1.0  # without layer gates every block runs
    assert all(s.execution_rate == closed and s.channel_rate == 0 for s in gatekit.gate_stats(gated).values())
    (output.sum() + gatekit.gate_loss(gated)).backward()
    assert [name for name, p in gated.named_parameters() if p.grad is None] == []


def test_gatekit_functions_take_the_ddp_wrapper_itself():
    gated = gatekit.convert(get_model("cifar/resnet8"), example_input=torch.randn(1, 3, 16, 16),
                            regularizer=gatekit.SparsityLoss(layer=0.1))
    wrapped = nn.DataParallel(gated)  # the same unwrapping as DistributedDataParallel, without a process group
    wrapped(torch.randn(2, 3, 16, 16))
    assert gatekit.gates_of(wrapped) == gatekit.gates_of(gated)
    torch.testing.assert_close(gatekit.gate_loss(wrapped), gatekit.gate_loss(gated))
    assert gatekit.gate_stats(wrapped) == gatekit.gate_stats(gated)
    assert [g["params"] for g in gatekit.param_groups(wrapped)] == [g["params"] for g in gatekit.param_groups(gated)]


def test_sync_batch_norm_conversion_keeps_the_gates_sparse_execution_and_weights():
    model = randomize_norms(get_model("cifar/resnet8", shortcut="B").eval())
    images = torch.randn(3, 3, 16, 16) + 2 * torch.randn(3, 3, 1, 1)
    gated = gatekit.convert(model, example_input=images[:1]).eval()
    randomize_gates(gated)
    with torch.no_grad():
        expected = gated(images)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(gated)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert synced.gatekit.sites == gated.gatekit.sites
    assert set(synced.state_dict()) == set(model.state_dict()) | {k for k in gated.state_dict() if "gatekit" in k}
    fast = gatekit.sparse(synced)
    with torch.no_grad():
        torch.testing.assert_close(synced(images), expected)  # in eval mode it is batch norm
        torch.testing.assert_close(fast(images), expected, atol=1e-4, rtol=1e-4)
        synced(images[:1])
        with FlopCounterMode(display=False) as counter:
            fast(images[:1])
        assert counter.get_total_flops() // 2 == gatekit.dynamic_macs(synced).item()
