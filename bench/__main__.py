"""``python -m bench {linear,llama,conv,infer,memory,diffusion,calibrate,all} [--quick] [--threads N]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SUITES = ("linear", "llama", "conv", "infer", "memory", "diffusion", "calibrate")


def _run_suite(name: str, quick: bool, device: str, ranks: tuple[int, ...] | None = None,
               variants: tuple[str, ...] | None = None) -> list[dict]:
    """One suite's rows; ``ranks`` (llama, conv, diffusion, calibrate) and ``variants`` (llama, linear, conv,
    diffusion) narrow it."""
    if name == "linear":
        from .layers import run_linear

        return run_linear(quick, device, variants=variants)
    if name == "conv":
        from .layers import run_conv

        return run_conv(quick, device, variants=variants, ranks=ranks)
    if name == "llama":
        from .llama import run

        return run(quick, device, ranks=ranks, variants=variants)
    if name == "infer":
        from .infer import run

        return run(quick, device)
    if name == "memory":
        from .memory import run_merge_load, run_peak

        return run_peak(quick, device, ranks=ranks) + run_merge_load(quick, device)
    if name == "diffusion":
        from .diffusion import run

        return run(quick, device, ranks=ranks, variants=variants)
    if name == "calibrate":
        from .calibrate import run

        return run(quick, device, ranks=ranks)
    raise ValueError(f"unknown suite {name!r}; expected one of {SUITES} or 'all'")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("suites", nargs="+", choices=[*SUITES, "all", "render"],
                   help="suites to run; 'render' rewrites RESULTS.md from RESULTS.json without running")
    p.add_argument("--quick", action="store_true", help="smallest sizes and fewest repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is far less noisy on an oversubscribed machine)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--ranks", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                   help="comma-separated ranks for llama, conv, memory, diffusion and calibrate (default: each suite's sweep)")
    p.add_argument("--variants", type=lambda v: tuple(v.split(",")), default=None,
                   help="comma-separated variants for llama, linear, conv and diffusion (floor is always added)")
    p.add_argument("--note", action="append", default=[], help="a line to add to RESULTS.md (repeatable)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other suites' rows from the existing RESULTS.json (re-run only some suites)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("LOHAKIT_TRITON", None)  # the lohakit_triton variant switches the kernels on itself
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # memory-suite subprocesses
    named = [s for s in args.suites if s != "all"]
    suites = tuple(dict.fromkeys(([*SUITES[:-1]] if "all" in args.suites else []) + named))  # all = every timing suite
    from .report import machine, table, targets

    json_path = os.path.splitext(args.out)[0] + ".json"
    if "render" in args.suites:
        with open(json_path) as f:
            saved = json.load(f)
        _write(saved["rows"], saved["runs"], args.out)
        return 0
    load0 = os.getloadavg()
    rows: list[dict] = []
    t0 = time.perf_counter()
    for s in suites:
        t = time.perf_counter()
        variants = None if args.variants is None else tuple(dict.fromkeys(("floor", *args.variants)))
        rows += _run_suite(s, args.quick, args.device, ranks=args.ranks, variants=variants)
        print(f"[bench] {s}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    load1 = os.getloadavg()
    print(table(rows))
    print(targets(rows))
    if not args.no_write:
        notes = [
            f"threads: {torch.get_num_threads()}; load average (1 min) before/after: {load0[0]:.1f} / {load1[0]:.1f}",
            f"wall time: {time.perf_counter() - t0:.0f} s",
            *args.note,
        ]
        if args.device == "cpu":
            notes.append("CPU sizes (BRIEF §6 CPU setting, fp32); the GPU sizes and targets need a CUDA "
                         "machine: run the same command there (it switches to the bf16 GPU shapes)")
        command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
        import datetime

        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        runs = [{"command": command, "suites": list(suites), "notes": notes, "date": date, "machine": machine()}]
        if args.merge and os.path.exists(json_path):
            with open(json_path) as f:
                old = json.load(f)
            rows = [r for r in old["rows"] if r["suite"] not in suites] + rows
            runs = [r for r in old.get("runs", []) if set(r["suites"]) - set(suites)] + runs
        with open(json_path, "w") as f:
            json.dump({"rows": rows, "runs": runs}, f, indent=1)
        _write(rows, runs, args.out)
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


def _write(rows: list[dict], runs: list[dict], out: str) -> None:
    from .report import write_results

    if len(runs) == 1:
        r = runs[0]
        write_results(rows, out, r["command"], r["notes"], r.get("date"), r.get("machine"))
    else:  # merged: one line per run, naming the suites it produced
        lines = [f"run {r.get('date', '?')}: `{r['command']}` → {', '.join(r['suites'])}; " + "; ".join(r["notes"])
                 for r in runs]
        write_results(rows, out, f"{len(runs)} runs, one per line below", lines, runs[-1].get("date"),
                      runs[-1].get("machine"))


if __name__ == "__main__":
    raise SystemExit(main())
