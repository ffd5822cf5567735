"""(e) peak memory of a training step (one subprocess per variant) and merge / load times.

Peak memory: CUDA ``max_memory_allocated`` on GPU; on CPU the peak RSS of a fresh process
(``ru_maxrss``) that builds the Llama-shaped model, adapts it and runs a few AdamW steps.
The ``step`` column is that peak minus the RSS after building (what training added).

Merge / load: a 7B-*shaped* adapter set (32 decoder layers × 7 projections = 224 adapted
modules, r = 8). On GPU the projections have Llama-7B's sizes (bf16); on CPU a stand-in with
hidden 512 / intermediate 1376 keeps the module count and structure but not the sizes.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from typing import Any

import torch
import torch.nn as nn

from .llama import CPU_SHAPE, GPU_SHAPE, TARGETS, LlamaShape, LlamaStep, make_llama
from .variants import ALL_VARIANTS, TRITON_VARIANTS, available_variants, build_variant

MEMORY_VARIANTS = tuple(v for v in ALL_VARIANTS if v != "lohakit_mat")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(variant: str, r: int, device: str, steps: int) -> dict:
    """Runs in the subprocess: build, adapt, train ``steps`` steps, report peaks."""
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    model = build_variant(variant, make_llama(shape, device), TARGETS, r, copy_base=False)
    step = LlamaStep(model, shape, device)
    return {"variant": variant, **measure_peak(step, device, steps)}


def measure_peak(step: Any, device: str, steps: int) -> dict[str, float]:
    """``{"before_mb", "peak_mb"}`` around ``steps`` calls of ``step``: memory held before, and the
    peak while stepping (CUDA: ``max_memory_allocated``; CPU: VmHWM after a reset, else the
    lifetime peak, with ``before`` 0)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _status_mb("VmRSS")
        if not _reset_peak_rss():  # fall back to the lifetime peak (includes building the model)
            before = 0.0
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mb("VmHWM")  # peak RSS since the reset
    return {"before_mb": before, "peak_mb": peak}


def run_peak(quick: bool, device: str, ranks: tuple[int, ...] | None = None,
             variants: tuple[str, ...] | None = None) -> list[dict]:
    """Peak memory of a training step per variant, each in a fresh process, at each rank."""
    out = []
    for r in ranks or ((8,) if quick else (8, 32)):
        out += _run_peak_rank(quick, device, r, variants)
    return out


def _run_peak_rank(quick: bool, device: str, r: int, variants: tuple[str, ...] | None) -> list[dict]:
    steps = 2 if quick else 4
    variants = variants or available_variants(device, MEMORY_VARIANTS)
    rows = []
    for v in variants:
        cmd = [sys.executable, "-m", "bench.memory", v, str(r), device, str(steps)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("LOHAKIT_TRITON", None)
        if v in TRITON_VARIANTS:
            env["LOHAKIT_TRITON"] = "1"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {v!r} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    floor = next(x for x in rows if x["variant"] == "floor")
    out = []
    for x in rows:
        out.append({
            "suite": "memory", "case": f"train step r={r}", "variant": x["variant"],
            "peak_mb": x["peak_mb"], "step_mb": x["peak_mb"] - x["before_mb"],
            "ratio": x["peak_mb"] / floor["peak_mb"],
            "step_ratio": (x["peak_mb"] - x["before_mb"]) / max(floor["peak_mb"] - floor["before_mb"], 1e-9),
        })
    return out


STANDIN_SHAPE = LlamaShape(512, 1376, 32, 8, 1024, 1, 1, torch.float32)
SEVEN_B_SHAPE = LlamaShape(4096, 11008, 32, 32, 32000, 1, 1, torch.bfloat16)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _merge_all(model: nn.Module) -> None:
    # PEFT tuner layers and LyCORIS modules both expose a per-layer merge
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "base_layer") and not hasattr(m, "loha_layers"):
            m.merge()
        elif hasattr(m, "merge_to"):
            m.merge_to(1.0)


def run_merge_load(quick: bool, device: str, r: int = 8) -> list[dict]:
    """Merge time per tool, and save/load time for lohakit and PEFT LoHa, 224 adapted modules."""
    shape = SEVEN_B_SHAPE if device == "cuda" else STANDIN_SHAPE
    base = make_llama(shape, device)
    rows = []
    label = "224 modules, 7B shapes" if device == "cuda" else "224 modules, CPU stand-in (hidden 512)"
    for v in ("peft_lora", "peft_loha", "lycoris_loha", "lohakit"):
        m = build_variant(v, base, TARGETS, r)
        with torch.no_grad():
            ms = _time(m.merge_adapter if v == "lohakit" else (lambda m=m: _merge_all(m)))
        rows.append({"suite": "merge_load", "case": f"merge ({label})", "variant": v, "ms": ms})
        del m
    import peft

    from lohakit import LoHaModel

    with tempfile.TemporaryDirectory() as tmp:
        lk = build_variant("lohakit", base, TARGETS, r)
        lk.save_pretrained(os.path.join(tmp, "lohakit"))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=r, alpha=r, target_modules=TARGETS))
        pm.save_pretrained(os.path.join(tmp, "peft"))
        del lk, pm
        fresh = copy.deepcopy(base)
        ms = _time(lambda: LoHaModel.from_pretrained(fresh, os.path.join(tmp, "lohakit")))
        rows.append({"suite": "merge_load", "case": f"load ({label})", "variant": "lohakit", "ms": ms})
        fresh = copy.deepcopy(base)
        ms = _time(lambda: peft.PeftModel.from_pretrained(fresh, os.path.join(tmp, "peft")))
        rows.append({"suite": "merge_load", "case": f"load ({label})", "variant": "peft_loha", "ms": ms})
    return rows


if __name__ == "__main__":
    # threads: inherited through OMP_NUM_THREADS (python -m bench --threads sets it)
    _v, _r, _d, _s = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(worker(_v, _r, _d, _s)))
