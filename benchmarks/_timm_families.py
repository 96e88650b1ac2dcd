"""One timm model per architecture family through gatekit: ``benchmarks/coverage.py --timm-families``.

A family is a model name up to its first digit, underscore or end, a version suffix kept
(``resnet50d`` -> ``resnet``, ``mobilenetv3_small_100`` -> ``mobilenetv3``, ``tf_``/``legacy_``/``gluon_``
prefixes dropped). Of each family the smallest-looking model is taken (a size word such as ``atto``
or ``tiny``, else the smallest first number in its name: depth or width). Each is built with random weights
(``pretrained=False``) and checked at a small input, with a time limit, for: converts? sites gated
and skipped (with reasons), function preserved, sparse == masked, dense and per-sample dynamic MACs
equal to ``FlopCounterMode`` / 2. Anything but a ``GatekitError`` out of gatekit is a crash.
"""
from __future__ import annotations

import re
import signal
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import timm
import torch
from torch import nn

import gatekit

FAMILY = re.compile(r"^(?:tf_|legacy_|gluon_)?([a-z]+?(?:v\d+)?)(?=\d|_|$)")
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "mini", "small", "xs", "s")
TOLERANCE = 1e-4
# The CI sample: the three patterns (partial residual, multi-branch fusion, split inputs),
# nested adds picking one gated layer (LCNetV2's re-parameterisable branches) and two plain
# residual CNNs; each runs in seconds at 32 x 32.
CI_SAMPLE = ("rexnet", "hrnet", "res", "lcnetv2", "dla", "cspresnet")  # "res": Res2Net


@dataclass
class FamilyResult:
    """What :func:`check_family` found; ``outcome`` is one of "ok", "no residual block", "not traceable",
    "cannot build", "input too small" (the original fails at the small and at its own input size), "timeout",
    "refused", "checks fail", "crash"."""

    family: str
    model: str
    outcome: str = ""
    gated: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    preserved: float | None = None
    sparse: float | None = None
    dense_macs_equal: bool | None = None
    dynamic_macs_equal: bool | None = None
    detail: str = ""
    seconds: float = 0.0  # gatekit's: convert and the checks, what the time limit covers
    model_seconds: float = 0.0  # timm's: building the model and its reference forward, outside the limit


def family_of(name: str) -> str:
    match = FAMILY.match(name)
    return match.group(1) if match else name


def representatives(names: list[str]) -> dict[str, str]:
    """The smallest-looking model of each family, families in alphabetical order."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(family_of(name), []).append(name)
    return {family: min(members, key=_size_key) for family, members in sorted(families.items())}


def _size_key(name: str) -> tuple[int, int, int, str]:
    parts = re.split(r"[_.]", name)
    word = min((SIZE_WORDS.index(p) for p in parts if p in SIZE_WORDS), default=len(SIZE_WORDS))
    number = re.search(r"\d+", name)
    return word, int(number.group()) if number else 10**6, len(name), name


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` on the way swallows it."""


def _alarm(signum, frame):
    raise _Timeout()


def check_family(
    family: str, model_name: str, helpers, *, size: int = 64, seconds: int = 120, seed: int = 0
) -> FamilyResult:
    """Build ``model_name`` with random weights and run gatekit's checks on it (see the module doc).

    ``helpers`` is benchmarks/coverage.py: its norm randomization, random gates and FLOP count. The
    time limit covers gatekit's part; building a 1B-parameter model and its reference forward at
    its own input size are timm's and torch's, recorded apart in ``model_seconds``.
    """
    flop_counter_macs, randomize, randomize_gates = helpers._flop_counter_macs, helpers._randomize, helpers._randomize_gates
    result, start = FamilyResult(family, model_name), time.perf_counter()
    built = _build(result, size, seed, randomize)
    result.model_seconds, start = time.perf_counter() - start, time.perf_counter()
    if built is None:
        return result
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        _run(result, *built, seed, flop_counter_macs, randomize_gates)
    except _Timeout:
        result.outcome, result.detail = "timeout", f"over {seconds} s"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        result.seconds = time.perf_counter() - start
    return result


def _build(result: FamilyResult, size: int, seed: int, randomize) -> tuple[nn.Module, torch.Tensor, torch.Tensor] | None:
    """The model, its input and its output; None (the outcome set) where timm or the model fails."""
    torch.manual_seed(seed)
    try:
        model = randomize(timm.create_model(result.model, pretrained=False).eval(), seed)
    except Exception as error:  # noqa: BLE001  (timm, not gatekit)
        result.outcome, result.detail = "cannot build", f"{type(error).__name__}: {str(error)[:160]}"
        return None
    channels, native = model.pretrained_cfg.get("input_size", (3, 224, 224))[0], model.pretrained_cfg.get("input_size")
    # At the small size first; a model built for one input size (most transformers) at its own.
    for height, width in [(size, size)] + ([tuple(native[1:])] if native and tuple(native[1:]) != (size, size) else []):
        images = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                expected = model(images)
            break
        except Exception as error:  # noqa: BLE001  (the model itself, not gatekit)
            result.outcome, result.detail = "input too small", f"{type(error).__name__}: {str(error)[:160]}"
    else:
        return None
    result.outcome, result.detail = "", "" if (height, width) == (size, size) else f"at {height}x{width}"
    return model, images, expected


def _run(result: FamilyResult, model: nn.Module, images: torch.Tensor, expected: torch.Tensor, seed: int,
         flop_counter_macs, randomize_gates) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gatekit.SkippedBlocksWarning)
            gated = gatekit.convert(model, example_input=images[:1]).eval()
    except gatekit.NoResidualBlockError as error:
        result.outcome, result.detail = "no residual block", _first_line(error)
        _count_skipped(result, model, images)
        return
    except gatekit.TraceError as error:
        result.outcome, result.detail = "not traceable", _first_line(error)
        return
    except gatekit.GatekitError as error:
        result.outcome, result.detail = "refused", _first_line(error)
        return
    except Exception as error:  # noqa: BLE001  (a gatekit bug: reported, never hidden)
        result.outcome, result.detail = "crash", f"{type(error).__name__}: {str(error)[:200]}"
        return
    result.gated, result.skipped = len(gated.gatekit.sites), len(gated.gatekit.skipped)
    result.skip_reasons = dict(Counter(site.kind for site in gated.gatekit.skipped))
    try:
        _measure(result, model, gated, images, expected, seed, flop_counter_macs, randomize_gates)
    except gatekit.GatekitError as error:
        result.outcome, result.detail = "checks fail", _first_line(error)
    except Exception as error:  # noqa: BLE001
        result.outcome, result.detail = "crash", f"{type(error).__name__}: {str(error)[:200]}"


def _measure(result, model, gated, images, expected, seed, flop_counter_macs, randomize_gates) -> None:
    with torch.no_grad():
        result.preserved = ((gated(images) - expected).abs().max() / expected.abs().max()).item()
        result.dense_macs_equal = gated.gatekit.dense_macs == flop_counter_macs(model, images[:1])
        randomize_gates(gated, seed)
        fast = gatekit.sparse(gated)
        masked = gated(images)
        result.sparse = ((fast(images) - masked).abs().max() / masked.abs().max()).item()
        dynamic = []
        for image in images.split(1):
            gated(image)
            dynamic.append(gatekit.dynamic_macs(gated).item() == flop_counter_macs(fast, image))
        result.dynamic_macs_equal = all(dynamic)
    failures = [
        text for text, failed in (
            (f"function changed by {result.preserved:.2g}", result.preserved > TOLERANCE),
            (f"sparse differs by {result.sparse:.2g}", result.sparse > TOLERANCE),
        ) if failed
    ]
    result.outcome = "checks fail" if failures else "ok"
    result.detail = "; ".join(failures + ([result.detail] if result.detail else []))


def _count_skipped(result: FamilyResult, model: nn.Module, images: torch.Tensor) -> None:
    """For a model with no gateable block: the adds gatekit saw and why it skipped them."""
    try:
        _, skipped = gatekit.gate_sites(model, example_input=images[:1], skipped=True)
    except gatekit.GatekitError:
        return
    result.skipped = len(skipped)
    result.skip_reasons = dict(Counter(site.kind for site in skipped))


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def table(results: list[FamilyResult]) -> str:
    lines = [
        "| family | model | outcome | gated | skipped (reasons) | function preserved | sparse == masked | dense MACs == FlopCounterMode | dynamic MACs == FlopCounterMode (sparse) | detail |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        reasons = ", ".join(f"{kind} x{count}" for kind, count in sorted(r.skip_reasons.items()))
        skipped = f"{r.skipped}" + (f" ({reasons})" if reasons else "")
        number = lambda value: "" if value is None else f"{value:.1e}"  # noqa: E731
        flag = lambda value: "" if value is None else ("yes" if value else "no")  # noqa: E731
        detail = r.detail.replace("|", "\\|")
        lines.append(
            f"| {r.family} | {r.model} | {r.outcome} | {r.gated} | {skipped} | {number(r.preserved)} | "
            f"{number(r.sparse)} | {flag(r.dense_macs_equal)} | {flag(r.dynamic_macs_equal)} | {detail} |"
        )
    return "\n".join(lines)


def totals(results: list[FamilyResult]) -> str:
    counts = Counter(r.outcome for r in results)
    converted = [r for r in results if r.gated]
    exact = sum(bool(r.dense_macs_equal and r.dynamic_macs_equal) for r in converted)
    parts = ", ".join(f"{outcome}: {count}" for outcome, count in counts.most_common())
    return (
        f"{len(results)} families; {parts}. {len(converted)} converted with at least one gated block, "
        f"{sum(r.gated for r in converted)} blocks gated and {sum(r.skipped for r in results)} skipped; "
        f"MACs equal FlopCounterMode (dense and per sample) in {exact} of the {len(converted)}."
    )
