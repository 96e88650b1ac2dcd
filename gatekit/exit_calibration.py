"""gatekit.calibrate_exits: set the exit thresholds on calibration data, to a MAC budget or to an
agreement with the final head."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._batches import as_batches, split_batch
from .errors import GatekitError
from .exit_macs import exit_costs_per_sample, measure_exit_costs
from ._exit_info import exit_policy, exits_of

# Thresholds tried: this many quantiles of the calibration confidences (plus "never leave").
_CANDIDATES = 400


@dataclass(frozen=True)
class ExitCalibration:
    """What :func:`calibrate_exits` chose, measured on the calibration data.

    ``mac_fraction`` is the mean MACs over ``reference_macs``; ``exit_rates`` the fraction of samples
    leaving at each exit, the final head last; ``accuracy`` is None without labels.
    """

    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]
    mean_macs: float
    reference_macs: int
    accuracy: float | None
    agreement: float
    exit_rates: tuple[float, ...]

    @property
    def mac_fraction(self) -> float:
        return self.mean_macs / self.reference_macs


@dataclass(frozen=True)
class _Outputs:
    """Everything the threshold search needs, per calibration sample."""

    confidences: Tensor  # [N, exits], at the policy's temperatures
    predictions: Tensor  # [N, exits + 1]
    costs: Tensor  # [N, exits + 1] MACs of leaving at each exit
    labels: Tensor | None
    logits: list[Tensor]  # per exit, [N, classes], for temperature fitting


def calibrate_exits(
    model: nn.Module,
    data: Tensor | Dataset | Iterable,
    *,
    budget: float | None = None,
    agreement: float | None = None,
    reference_macs: int | None = None,
    fit_temperatures: bool = False,
    per_exit: bool = False,
    batch_size: int = 500,
) -> ExitCalibration:
    """Set one threshold shared by every exit (or, with ``per_exit``, one per exit) so that the model
    meets a target on ``data``.

    With ``budget``, the mean MACs (heads included) stay within ``budget * reference_macs`` at the
    best accuracy found (the largest agreement with the final head without labels). With
    ``agreement``, the exits' predictions agree with the final head's on at least that fraction of
    the samples at the lowest mean MACs found. The model must be in eval mode.

    Args:
        model: a model with exits whose heads are fitted (:func:`gatekit.fit_exits`).
        data: calibration images or ``(images, labels)`` pairs (a held-out split, not the test set).
        budget: the target, a fraction of ``reference_macs`` in (0, 1].
        agreement: the other target, a fraction in (0, 1].
        reference_macs: what the budget is a fraction of; default the model's own MACs without
            heads (``model.gatekit_exits.dense_macs``), e.g. pass the unpruned model's.
        fit_temperatures: first fit a temperature per head on the labels (Guo et al. 2017), so
            that one threshold means the same probability at every exit.
        per_exit: start from the shared threshold, then move each exit's own threshold in turn
            (coordinate ascent over quantiles of its confidences) while that improves the target;
            nine thresholds fitted on a few thousand samples can overfit them: check on held-out data.
        batch_size: batch size of the calibration pass.

    Returns:
        An :class:`ExitCalibration`; the thresholds are set on the model.

    Raises:
        GatekitError: the model is in training mode; not exactly one target; a target outside
            (0, 1]; a budget below what leaving at the first exit costs; empty data;
            ``fit_temperatures`` without labels.
    """
    info = exits_of(model)
    policy = exit_policy(model)
    if model.training:
        raise GatekitError("calibrate_exits runs the model as deployed: call `model.eval()` first.")
    if (budget is None) == (agreement is None):
        raise GatekitError("give one target: `budget=` (a fraction of the MACs) or `agreement=` (with the final head).")
    target = budget if budget is not None else agreement
    name = "budget" if budget is not None else "agreement"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise GatekitError(f"{name}={target!r}: give a fraction in (0, 1] (0.5 is half).")
    outputs = _collect(model, data, batch_size)
    if fit_temperatures:
        if outputs.labels is None:
            raise GatekitError("fit_temperatures needs labels: give (images, labels) pairs.")
        policy.temperatures.copy_(torch.tensor([_temperature(logits, outputs.labels) for logits in outputs.logits]))
        outputs = _Outputs(policy.confidences(outputs.logits).cpu(), outputs.predictions, outputs.costs,
                           outputs.labels, outputs.logits)
    reference = reference_macs or info.dense_macs
    if budget is not None:
        earliest = outputs.costs[:, 0].double().mean().item()
        if budget * reference < earliest:
            raise GatekitError(
                f"budget={budget} is {budget * reference:,.0f} MACs, below the {earliest:,.0f} that leaving at "
                f"the first exit costs ({earliest / reference:.3f} of the reference): raise the budget, "
                f"or add an earlier exit."
            )
    max_macs = budget * reference if budget is not None else None
    policy.thresholds.fill_(_search(policy, outputs, max_macs, agreement))
    if per_exit:
        policy.thresholds.copy_(_search_per_exit(policy, outputs, max_macs, agreement))
    return _summary(policy, outputs, reference)


def _collect(model: nn.Module, data, batch_size: int) -> _Outputs:
    policy = exit_policy(model)
    costs = None
    chunks: dict[str, list] = {"logits": [], "final": [], "costs": [], "labels": []}
    with torch.no_grad():
        for batch in as_batches(data, batch_size):
            inputs, labels = split_batch(batch)
            if inputs.shape[0] == 0:
                continue
            inputs = inputs.to(next(iter(model.parameters())).device)
            if costs is None:
                costs = measure_exit_costs(model, inputs[:1])
            model(inputs)
            chunks["logits"].append([logits.float().cpu() for logits in policy.exit_logits])
            chunks["final"].append(policy.final_logits.float().cpu())
            chunks["costs"].append(exit_costs_per_sample(model, costs))
            chunks["labels"].append(labels)
    if not chunks["final"]:
        raise GatekitError("the calibration data holds no sample: give at least one input.")
    logits = [torch.cat(per_exit) for per_exit in zip(*chunks["logits"])]
    final = torch.cat(chunks["final"])
    labels = None if any(label is None for label in chunks["labels"]) else torch.cat(
        [label.cpu().long() for label in chunks["labels"]])
    predictions = torch.stack([l.argmax(1) for l in logits] + [final.argmax(1)], 1)
    return _Outputs(policy.confidences(logits).cpu(), predictions, torch.cat(chunks["costs"]), labels, logits)


def _taken(policy, confidences: Tensor, threshold: float) -> Tensor:
    """Each sample's exit were every threshold ``threshold``."""
    return policy.decide(confidences, confidences.new_full(confidences.shape[1:], threshold))


def _search(policy, outputs: _Outputs, max_macs: float | None, agreement: float | None) -> float:
    """The shared threshold: the best accuracy within ``max_macs``, or the lowest MACs at ``agreement``."""
    values = outputs.confidences.flatten().double()
    quantiles = torch.linspace(0, 1, _CANDIDATES, dtype=torch.float64)
    candidates = sorted(set(torch.quantile(values, quantiles).tolist()) | {math.inf})
    final = outputs.predictions[:, -1]
    best, best_key = math.inf, None
    for threshold in candidates:
        taken = _taken(policy, outputs.confidences, threshold)
        chosen = outputs.predictions.gather(1, taken[:, None]).squeeze(1)
        macs = outputs.costs.gather(1, taken[:, None]).double().mean().item()
        agrees = (chosen == final).double().mean().item()
        if max_macs is not None:
            if macs > max_macs:
                continue
            score = (chosen == outputs.labels).double().mean().item() if outputs.labels is not None else agrees
            key = (score, threshold)  # ties: the higher threshold, which leaves less to chance
        else:
            if agrees < agreement:
                continue
            key = (-macs, threshold)
        if best_key is None or key > best_key:
            best, best_key = threshold, key
    if best_key is None:  # only reachable with a budget: the lowest candidate leaves everyone at exit 0
        best = -math.inf
    return best


def _search_per_exit(policy, outputs: _Outputs, max_macs: float | None, agreement: float | None,
                     rounds: int = 3, candidates: int = 100) -> Tensor:
    """Per-exit thresholds from the current shared ones: each exit's threshold in turn takes the
    candidate with the best key (as in :func:`_search`), the others held; never worse than the start."""
    thresholds = policy.thresholds.detach().clone().double()
    quantiles = torch.linspace(0, 1, candidates, dtype=torch.float64)
    options = [sorted(set(torch.quantile(outputs.confidences[:, k].double(), quantiles).tolist()) | {math.inf})
               for k in range(len(thresholds))]
    best_key = _key(policy, outputs, thresholds, max_macs, agreement)
    for _ in range(rounds):
        for k, values in enumerate(options):
            for value in values:
                trial = thresholds.clone()
                trial[k] = value
                key = _key(policy, outputs, trial, max_macs, agreement)
                if key is not None and (best_key is None or key > best_key):
                    thresholds, best_key = trial, key
    return thresholds.to(policy.thresholds.dtype)


def _key(policy, outputs: _Outputs, thresholds: Tensor, max_macs: float | None, agreement: float | None):
    """What the search maximises for ``thresholds``, None where they miss the target: accuracy (or
    agreement without labels) within ``max_macs``, or minus the MACs at ``agreement``."""
    taken = policy.decide(outputs.confidences, thresholds.to(outputs.confidences.dtype))
    chosen = outputs.predictions.gather(1, taken[:, None]).squeeze(1)
    macs = outputs.costs.gather(1, taken[:, None]).double().mean().item()
    agrees = (chosen == outputs.predictions[:, -1]).double().mean().item()
    if max_macs is not None:
        if macs > max_macs:
            return None
        return (chosen == outputs.labels).double().mean().item() if outputs.labels is not None else agrees
    return -macs if agrees >= agreement else None


def _summary(policy, outputs: _Outputs, reference: int) -> ExitCalibration:
    taken = policy.decide(outputs.confidences, policy.thresholds.to(outputs.confidences.dtype))
    chosen = outputs.predictions.gather(1, taken[:, None]).squeeze(1)
    rates = torch.bincount(taken, minlength=outputs.predictions.shape[1]).double() / len(taken)
    return ExitCalibration(
        thresholds=tuple(policy.thresholds.tolist()),
        temperatures=tuple(policy.temperatures.tolist()),
        mean_macs=outputs.costs.gather(1, taken[:, None]).double().mean().item(),
        reference_macs=int(reference),
        accuracy=(chosen == outputs.labels).double().mean().item() if outputs.labels is not None else None,
        agreement=(chosen == outputs.predictions[:, -1]).double().mean().item(),
        exit_rates=tuple(rates.tolist()),
    )


def _temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (a 1-D search)."""
    log_temperature = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_temperature.exp().item()
