"""Side-by-side timing shared by the benchmark scripts: variants take turns within each repeat, so
load that drifts on a shared machine hits them alike, and ratios are taken within a repeat."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, loops: int | dict[str, int] = 1, rotate: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each repeat, averaged over ``loops`` calls (one count, or
    one per variant). With ``rotate`` the order shifts by one each repeat. No warmup is done here."""
    loops = loops if isinstance(loops, dict) else dict.fromkeys(calls, loops)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(loops[name]):
                calls[name]()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of the ratio within each repeat: robust to load that drifts between repeats."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
