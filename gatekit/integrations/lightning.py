"""A PyTorch Lightning callback that trains a gated model: loss term, gate logs, schedules, recalibration.

Lightning has no callback hook that may change the loss: ``on_before_backward`` receives it only
to read. So, while ``fit`` runs, :class:`GateCallback` wraps the LightningModule's
``training_step`` and adds the sparsity loss to what it returns (a tensor, or the ``"loss"`` of a
dict); ``teardown`` puts the original back. A module that adds ``gatekit.gate_loss`` itself keeps
the callback for logging and annealing with ``add_loss=False``.

Install with ``pip install 'gatekit[lightning]'``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Literal

from torch import Tensor, nn

from ..batchnorm import recalibrate_batchnorm
from ..distillation import DistillationLoss
from ..errors import GatekitError, MissingDependencyError, NotConvertedError
from ..gated_model import GatekitInfo
from ..logging import GateMeter
from ..losses import gate_loss
from ..macs import BlockCosts
from ..noise import NoiseSchedule
from ..sparsity_schedule import SparsitySchedule
from ..temperature import TemperatureSchedule

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise MissingDependencyError(
            "gatekit.integrations.lightning needs PyTorch Lightning: `pip install 'gatekit[lightning]'`."
        ) from error

__all__ = ["GateCallback"]


class GateCallback(pl.Callback):
    """Add the gates' sparsity loss, log gate rates and dynamic MACs per epoch, anneal the temperature.

    Logged at the end of each training and validation epoch (``pl_module.log_dict``, so to every
    logger of the Trainer, averaged over processes): ``gatekit/train/execution_rate``,
    ``.../channel_rate``, ``.../mean_macs``, ``.../dense_macs``, ``.../mac_fraction``, each block's
    ``.../<block>/execution_rate`` and ``.../<block>/channel_rate`` (see :mod:`gatekit.logging`),
    ``gatekit/train/temperature`` with a schedule, and ``gatekit/train/gate_loss``. Training
    figures count the sampled decisions, validation figures the deterministic eval-mode ones.

    Args:
        loss: the term to add, called on the gated model after each training forward; by default
            :func:`gatekit.gate_loss`, the regularizer attached at conversion.
        add_loss: wrap ``training_step`` to add ``loss``; False when the module adds it itself.
        model: attribute path of the gated model in the LightningModule (``"net"``,
            ``"backbone.model"``); by default the one submodule made by :func:`gatekit.convert`.
        temperature: a :class:`gatekit.TemperatureSchedule` of the same model, stepped after every
            training batch (``temperature_interval="step"``) or epoch (``"epoch"``).
        temperature_interval: when to step ``temperature``.
        costs: block costs at the training input size (:func:`gatekit.macs.measure_costs`); by
            default those at the conversion's example input.
        per_block: log each block's rates too.
        sparsity: a :class:`gatekit.SparsitySchedule` of the same model, stepped after every training batch.
        noise: a :class:`gatekit.NoiseSchedule` of the same model, stepped after every training batch.
        distillation: the :class:`gatekit.DistillationLoss` that ``training_step`` adds; the callback
            moves its teacher to the module's device when fitting starts (the teacher is no submodule,
            so Lightning would not move, train or checkpoint it).
        recalibrate_batches: at the end of fitting, re-estimate the batch-norm statistics on this
            many batches of the training loader with eval-mode gate decisions
            (:func:`gatekit.recalibrate_batchnorm`); 0 to skip.

    Raises:
        NotConvertedError: (at setup) the LightningModule holds no gated model, or ``model`` names none.
        GatekitError: (at setup) no loss to add, several gated models and no ``model``, or manual
            optimization with ``add_loss=True``.

    >>> trainer = lightning.Trainer(max_epochs=10, callbacks=[GateCallback()])  # doctest: +SKIP
    >>> trainer.fit(module)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        loss: Callable[[nn.Module], Tensor] | None = None,
        add_loss: bool = True,
        model: str | None = None,
        temperature: TemperatureSchedule | None = None,
        temperature_interval: Literal["step", "epoch"] = "step",
        costs: BlockCosts | None = None,
        per_block: bool = True,
        sparsity: SparsitySchedule | None = None,
        noise: NoiseSchedule | None = None,
        distillation: DistillationLoss | None = None,
        recalibrate_batches: int = 0,
    ) -> None:
        if temperature_interval not in ("step", "epoch"):
            raise GatekitError(f"temperature_interval={temperature_interval!r}: use 'step' or 'epoch'.")
        self.loss, self.add_loss, self.model_path = loss, add_loss, model
        self.temperature, self.temperature_interval = temperature, temperature_interval
        self.costs, self.per_block = costs, per_block
        self.schedules = [schedule for schedule in (sparsity, noise) if schedule is not None]
        self.distillation, self.recalibrate_batches = distillation, recalibrate_batches
        self.gated: nn.Module | None = None
        self._meters: dict[str, GateMeter] = {}

    # -- setup and teardown ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.gated = self._find_model(pl_module)
        self._meters = {split: GateMeter(self.gated, costs=self.costs, per_block=self.per_block)
                        for split in ("train", "val")}
        if stage == "fit" and self.add_loss:
            self._check_loss(pl_module)
            self._wrap_training_step(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.distillation is not None:
            self.distillation.teacher.to(pl_module.device)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recalibrate_batches:
            recalibrate_batchnorm(self.gated, trainer.train_dataloader, max_batches=self.recalibrate_batches)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "training_step" in vars(pl_module) and getattr(pl_module.training_step, "_gatekit_wrapped", False):
            del pl_module.training_step  # the class's own method shows through again

    def _find_model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_path is not None:
            try:
                model = pl_module.get_submodule(self.model_path)
            except AttributeError as error:
                raise NotConvertedError(f"GateCallback(model={self.model_path!r}): {error}.") from error
            if not isinstance(getattr(model, "gatekit", None), GatekitInfo):
                raise NotConvertedError(
                    f"GateCallback(model={self.model_path!r}): that submodule has no gatekit gates; "
                    f"convert it with gatekit.convert."
                )
            return model
        found = [(name, m) for name, m in pl_module.named_modules() if isinstance(getattr(m, "gatekit", None), GatekitInfo)]
        if not found:
            raise NotConvertedError(
                f"{type(pl_module).__name__} holds no gated model: assign `gatekit.convert(model)` to one "
                f"of its attributes before fitting."
            )
        if len(found) > 1:
            names = ", ".join(repr(name) for name, _ in found)
            raise GatekitError(f"{type(pl_module).__name__} holds several gated models ({names}): choose one "
                               f"with GateCallback(model=...).")
        return found[0][1]

    def _check_loss(self, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise GatekitError(
                "GateCallback cannot add the loss under manual optimization: add `gatekit.gate_loss(model)` "
                "to the loss you backpropagate and pass GateCallback(add_loss=False)."
            )
        if self.loss is None and self.gated.gatekit.regularizer is None:
            raise GatekitError(
                "GateCallback has no loss to add: convert with `regularizer=gatekit.SparsityLoss(...)`, pass "
                "GateCallback(loss=gatekit.SparsityLoss(...)), or add_loss=False to only log."
            )

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step
        if getattr(original, "_gatekit_wrapped", False):
            return

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._with_gate_loss(pl_module, original(*args, **kwargs))

        training_step._gatekit_wrapped = True
        pl_module.training_step = training_step

    def _with_gate_loss(self, pl_module: pl.LightningModule, output: Any) -> Any:
        if output is None:  # Lightning skips the step
            return None
        term = (self.loss or gate_loss)(self.gated)
        pl_module.log("gatekit/train/gate_loss", term.detach(), on_step=False, on_epoch=True)
        if isinstance(output, Tensor):
            return output + term
        if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
            return {**output, "loss": output["loss"] + term}
        raise GatekitError(
            f"training_step returned {type(output).__name__}: GateCallback adds its loss to a tensor or to "
            f"the 'loss' of a dict; otherwise add `gatekit.gate_loss(model)` yourself and pass add_loss=False."
        )

    # -- per batch and per epoch ---------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meters["train"].reset()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if outputs is not None:
            self._meters["train"].update()
        if self.temperature is not None and self.temperature_interval == "step":
            self.temperature.step()
        for schedule in self.schedules:
            schedule.step()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = {} if self.temperature is None else {"temperature": self.temperature.temperature}
        self._log(pl_module, "train", extra)
        if self.temperature is not None and self.temperature_interval == "epoch":
            self.temperature.step()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meters["val"].reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._meters["val"].update()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(pl_module, "val", {})

    def _log(self, pl_module: pl.LightningModule, split: str, extra: dict[str, float]) -> None:
        meter = self._meters[split]
        if meter.samples == 0:
            return
        record = {**meter.compute(), **extra}
        pl_module.log_dict({f"gatekit/{split}/{name}": value for name, value in record.items()},
                           on_step=False, on_epoch=True, sync_dist=True)

    # -- checkpoints: the schedule resumes where it was ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {} if self.temperature is None else {"temperature_steps": self.temperature.count}
        if self.schedules:
            state["schedule_steps"] = [schedule.count for schedule in self.schedules]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.temperature is not None and "temperature_steps" in state_dict:
            self.temperature.load_state_dict({"count": state_dict["temperature_steps"]})
        for schedule, count in zip(self.schedules, state_dict.get("schedule_steps", [])):
            schedule.load_state_dict({"count": count})
