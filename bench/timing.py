"""Interleaved timing: every repetition runs each variant once, in a random order."""

from __future__ import annotations

import gc
import random
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
    rng = random.Random(0)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            # a fresh random order each repetition: a rotation would keep every variant behind the
            # same neighbour, and for memory-bound calls what ran just before (its data in the
            # caches, or evicting ours) shifts the time by several percent
            for n in rng.sample(names, len(names)):
                sync(device)
                t0 = time.perf_counter()
                fns[n]()
                sync(device)
                times[n].append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was:
            gc.enable()
    return {n: statistics.median(v) for n, v in times.items()}
