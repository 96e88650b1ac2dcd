"""GateCallback in a real (tiny) Lightning Trainer run on the CPU."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gatekit
from toy_models import ToyResNet

pl = pytest.importorskip("lightning.pytorch")
from gatekit.integrations.lightning import GateCallback  # noqa: E402

_DATA = torch.Generator().manual_seed(0)  # the same data whatever ran before
X = torch.randn(32, 3, 8, 8, generator=_DATA)
Y = torch.randint(0, 5, (32,), generator=_DATA)


class Classifier(pl.LightningModule):
    def __init__(self, gated: nn.Module, returns: str = "tensor") -> None:
        super().__init__()
        self.net, self.returns = gated, returns
        self.task_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self.net(images), labels)
        self.task_losses.append(loss.item())
        return {"loss": loss} if self.returns == "dict" else loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(gatekit.param_groups(self.net, weight_decay=0.0), lr=0.1)


def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=8)


def fit(module, callback, epochs=1, **options):
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=2, num_sanity_val_steps=0, **options)
    trainer.fit(module, loader(), loader())
    return trainer


def gated_toy(**options):
    return gatekit.convert(ToyResNet(), example_input=X[:1], **options)


@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_callback_adds_the_attached_loss_and_logs_gate_statistics(returns):
    module = Classifier(gated_toy(regularizer=gatekit.SparsityLoss(layer=0.5, channel=0.5)), returns)
    losses = []
    module.on_before_backward = lambda loss: losses.append(loss.item())
    trainer = fit(module, GateCallback())
    gate_terms = [total - task for total, task in zip(losses, module.task_losses)]
    # The paper's sums over 2 layer gates and 16 filters: 0.5 * 2 + 0.5 * 16 = 9 with every gate on. Fresh
    # gates are on with probability sigmoid(3) = 0.95 under training noise, so the first term is a little less.
    assert 6.0 < gate_terms[0] <= 9.0
    assert all(term > 0 for term in gate_terms) and len(gate_terms) == 4
    metrics = trainer.callback_metrics
    for split in ("train", "val"):
        assert 0.0 <= metrics[f"gatekit/{split}/execution_rate"] <= 1.0
        assert 0.0 <= metrics[f"gatekit/{split}/blocks.1/channel_rate"] <= 1.0
        dense = module.net.gatekit.dense_macs
        assert metrics[f"gatekit/{split}/dense_macs"] == dense
        assert 0 < metrics[f"gatekit/{split}/mean_macs"] <= dense * 1.01
    assert metrics["gatekit/train/gate_loss"] > 0
    assert "training_step" not in vars(module)  # unwrapped after fit


def test_epoch_statistics_count_every_validation_sample_not_only_the_last_batch():
    gated = gated_toy(regularizer=gatekit.SparsityLoss(layer=0.1))
    first = gatekit.gates_of(gated)["blocks.0"]
    with torch.no_grad():  # block 0 runs for some of the 16 validation samples and not for others
        hidden = torch.relu(first.fc(gated.stem(X[:16]).mean((2, 3))))
        nn.init.normal_(first.layer_head.weight)
        logits = (hidden @ first.layer_head.weight.T).squeeze(1).sort().values
        # threshold in the widest gap between the 5th and 12th logits, far from rounding
        gap = int((logits[5:12] - logits[4:11]).argmax()) + 4
        first.layer_head.bias.fill_(-(logits[gap] + logits[gap + 1]).item() / 2)
        nn.init.normal_(first.channel_head.weight)
        first.channel_head.bias.zero_()
    module = Classifier(gated)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)
    trainer = fit(module, GateCallback(), limit_train_batches=1)
    gated.eval()
    rates, macs = [], []
    for images in (X[:8], X[8:16]):  # the two validation batches
        gated(images)
        rates.append(gatekit.gate_stats(gated)["blocks.0"].execution_rate)
        macs += gatekit.dynamic_macs(gated).tolist()
    assert 0.25 <= sum(rates) / 2 <= 0.75 and rates[0] != rates[1]  # the mean of one batch would not do
    metrics = trainer.callback_metrics
    assert metrics["gatekit/val/blocks.0/execution_rate"].item() == pytest.approx(sum(rates) / 2)
    assert metrics["gatekit/val/mean_macs"].item() == pytest.approx(sum(macs) / len(macs))


def test_temperature_schedule_steps_per_batch_and_resumes_from_a_checkpoint():
    gated = gated_toy(regularizer=gatekit.SparsityLoss(layer=0.1))
    schedule = gatekit.TemperatureSchedule(gated, start=8.0, end=1.0, steps=4)
    callback = GateCallback(temperature=schedule)
    trainer = fit(Classifier(gated), callback)
    assert schedule.count == 4 and all(g.temperature == pytest.approx(1.0) for g in gatekit.gates_of(gated).values())
    # the epoch-end log shows the temperature reached after the epoch's 4 steps
    assert trainer.callback_metrics["gatekit/train/temperature"] == pytest.approx(1.0)
    again = GateCallback(temperature=gatekit.TemperatureSchedule(gated, start=8.0, end=1.0, steps=8))
    again.load_state_dict(callback.state_dict())
    assert again.temperature.count == 4
    assert all(g.temperature == pytest.approx(8.0 * (1 / 8) ** 0.5) for g in gatekit.gates_of(gated).values())


class DistilledClassifier(Classifier):
    def __init__(self, gated: nn.Module, distillation: gatekit.DistillationLoss) -> None:
        super().__init__(gated)
        self.distillation = distillation  # not a module: Lightning neither trains nor saves the teacher

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        return nn.functional.cross_entropy(logits, labels) + self.distillation(logits, images)


def test_recipe_schedules_step_per_batch_distillation_runs_and_batch_norms_are_recalibrated_at_the_end(tmp_path):
    teacher = ToyResNet().eval()
    gated = gatekit.convert(teacher, example_input=X[:1], regularizer=gatekit.MacBudgetLoss(budget=0.6))
    sparsity = gatekit.SparsitySchedule(gated, steps=8)
    noise = gatekit.NoiseSchedule(gated, steps=2, delay=2)
    callback = GateCallback(sparsity=sparsity, noise=noise, distillation=gatekit.DistillationLoss(teacher),
                            recalibrate_batches=2)
    module = DistilledClassifier(gated, callback.distillation)
    fit(module, callback)
    assert sparsity.count == noise.count == 4 and sparsity.pressure == 0.5 and noise.noise == 0.0
    assert gated.gatekit.regularizer.target == pytest.approx(0.8)
    assert not any(m.training for m in teacher.modules()) and all(p.grad is None for p in teacher.parameters())
    assert not any(key.startswith("distillation") for key in module.state_dict())
    # The end-of-fit recalibration left statistics of the first two training batches, eval decisions.
    statistics = {k: v.clone() for k, v in gated.state_dict().items() if "running" in k}
    gatekit.recalibrate_batchnorm(gated, [X[:8], X[8:16]])
    assert all(torch.allclose(statistics[k], v, atol=1e-6) for k, v in gated.state_dict().items() if "running" in k)
    resumed = GateCallback(sparsity=gatekit.SparsitySchedule(gated, steps=8),
                           noise=gatekit.NoiseSchedule(gated, steps=2, delay=2))
    resumed.load_state_dict(callback.state_dict())
    assert [s.count for s in resumed.schedules] == [4, 4] and resumed.schedules[0].pressure == 0.5


def test_only_logging_leaves_the_loss_alone_and_a_user_loss_replaces_the_attached_one():
    module = Classifier(gated_toy())
    losses = []
    module.on_before_backward = lambda loss: losses.append(loss.item())
    fit(module, GateCallback(add_loss=False), limit_train_batches=2)
    assert losses == pytest.approx(module.task_losses)

    module = Classifier(gated_toy())
    losses.clear()
    module.on_before_backward = lambda loss: losses.append(loss.item())
    fit(module, GateCallback(loss=lambda model: torch.tensor(3.0)), limit_train_batches=2)
    assert [total - task for total, task in zip(losses, module.task_losses)] == pytest.approx([3.0, 3.0])


def test_setup_errors_say_what_to_do():
    with pytest.raises(gatekit.GatekitError, match="regularizer=gatekit.SparsityLoss"):
        fit(Classifier(gated_toy()), GateCallback())
    with pytest.raises(gatekit.NotConvertedError, match="holds no gated model"):
        fit(Classifier(ToyResNet()), GateCallback(add_loss=False))
    with pytest.raises(gatekit.NotConvertedError, match="model='net.head'"):
        fit(Classifier(gated_toy()), GateCallback(add_loss=False, model="net.head"))
    with pytest.raises(gatekit.GatekitError, match="'step' or 'epoch'"):
        GateCallback(temperature_interval="batch")
