"""Interleaved timing: every repetition runs each variant once, in a rotating order."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median wall time (ms) per callable, repetitions interleaved across callables.

    Args:
        fns: name -> zero-argument callable (one step of the variant).
        reps: Timed repetitions per variant.
        warmup: Untimed calls per variant first (allocator, autotuning, lazy init).
        device: Synchronised around every call.

    Returns:
        name -> median milliseconds.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            k = i % len(names)
            for n in names[k:] + names[:k]:  # rotate the order so no variant is always first
                sync(device)
                t0 = time.perf_counter()
                fns[n]()
                sync(device)
                times[n].append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was:
            gc.enable()
    return {n: statistics.median(v) for n, v in times.items()}
