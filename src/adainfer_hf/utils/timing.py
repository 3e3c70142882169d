"""Timing callables against each other on one device: the one helper the cost model, the few-rows kernel choice
and the benchmarks share."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["alternating_medians"]


def alternating_medians(fns: dict, repeats: int, device: torch.device, min_seconds: float = 0.0) -> dict:
    """Median seconds of each callable, run once to warm up, then `repeats` rounds, one timing of each per round
    (the order rotating, so drifts of the machine hit every callable alike). A timing runs a callable as many
    times as its warm-up says fill `min_seconds` (a sub-millisecond layer is timed over several calls)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = list(fns)
    calls = {}
    for name in names:
        sync()
        t0 = time.perf_counter()
        fns[name]()
        sync()
        calls[name] = max(1, min(64, int(min_seconds / max(time.perf_counter() - t0, 1e-9))))
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(ts) for name, ts in times.items()}
