"""Tables (markdown), the bar chart (PNG via matplotlib's Agg backend) and RESULTS.md."""

from __future__ import annotations

import os
import platform
from collections import OrderedDict

import torch


def machine() -> str:
    """One line describing the machine the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def table(rows: list[dict]) -> str:
    """One markdown table per suite: cases as rows, variants as columns, ``ms (ratio×)``."""
    out = []
    suites: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        suites.setdefault(r["suite"], []).append(r)
    for suite, rs in suites.items():
        variants = list(OrderedDict.fromkeys(r["variant"] for r in rs))
        cases = list(OrderedDict.fromkeys(r["case"] for r in rs))
        cell = {(r["case"], r["variant"]): r for r in rs}
        out.append(f"### {suite}\n")
        if suite == "memory":
            out.append("| case | variant | peak RSS / memory MiB | × floor | step MiB | step × floor |")
            out.append("|---|---|---|---|---|---|")
            for r in rs:
                out.append(f"| {r['case']} | {r['variant']} | {r['peak_mb']:.0f} | {r['ratio']:.2f} | "
                           f"{r['step_mb']:.0f} | {r['step_ratio']:.2f} |")
        elif suite == "calibrate":
            out.append("| case | factored ms | merged ms | materialised ms | fastest | cost model picks | picked / fastest |")
            out.append("|---|---|---|---|---|---|---|")
            for r in rs:
                miss = "" if r["ratio"] <= 1.03 else " (miss)"
                out.append(f"| {r['case']} | {_fmt_ms(r['ms_factored'])} | {_fmt_ms(r['ms_merged'])} | "
                           f"{_fmt_ms(r['ms_materialised'])} | {r['best']} | {r['pick']}{miss} | {r['ratio']:.2f} |")
        elif suite == "diffusion":
            out.append("| case | variant | step ms | × floor | × PEFT LoHa | × LyCORIS | peak MiB | peak × floor | step MiB |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in rs:
                peft, lyc = cell.get((r["case"], "peft_loha")), cell.get((r["case"], "lycoris_loha"))
                vs = [f"{r['ms'] / x['ms']:.2f}×" if x else "–" for x in (peft, lyc)]
                mem = ([f"{r['peak_mb']:.0f}", f"{r['mem_ratio']:.2f}×", f"{r['step_mb']:.0f}"] if "peak_mb" in r
                       else ["–"] * 3)
                out.append(f"| {r['case']} | {r['variant']} | {_fmt_ms(r['ms'])} | {r['ratio']:.2f}× | "
                           + " | ".join(vs + mem) + " |")
        elif suite == "merge_load":
            out.append("| case | " + " | ".join(variants) + " |")
            out.append("|---|" + "---|" * len(variants))
            for c in cases:
                vals = [f"{_fmt_ms(cell[(c, v)]['ms'])} ms" if (c, v) in cell else "–" for v in variants]
                out.append(f"| {c} | " + " | ".join(vals) + " |")
        else:
            out.append("| case | " + " | ".join(variants) + " |")
            out.append("|---|" + "---|" * len(variants))
            for c in cases:
                vals = []
                for v in variants:
                    r = cell.get((c, v))
                    vals.append("–" if r is None else f"{_fmt_ms(r['ms'])} ms ({r['ratio']:.2f}×)")
                out.append(f"| {c} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def _get(rows: list[dict], suite: str, case_prefix: str, variant: str) -> dict | None:
    return next((r for r in rows if r["suite"] == suite and r["case"].startswith(case_prefix) and r["variant"] == variant), None)


def targets(rows: list[dict]) -> str:
    """The issue's target ratios, computed from whatever suites ran."""
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]

    def add(name: str, a: dict | None, b: dict | None, goal: float, key: str = "ms") -> None:
        if a is None or b is None:
            return
        v = a[key] / b[key]
        lines.append(f"| {name} | {v:.2f}× | ≤ {goal:.2f}× | {'yes' if v <= goal else 'NO'} |")

    lk = _get(rows, "llama", "r=8", "lohakit")
    add("llama r=8 step: lohakit / floor", lk, _get(rows, "llama", "r=8", "floor"), 1.12)
    add("llama r=8 step: lohakit / PEFT LoHa", lk, _get(rows, "llama", "r=8", "peft_loha"), 0.55)
    add("llama r=8 step: lohakit / PEFT LoRA", lk, _get(rows, "llama", "r=8", "peft_lora"), 1.10)
    for form in ("flat", "effective"):
        add(f"conv 3x3 320ch 32² {form} r=8: lohakit / PEFT LoHa", _get(rows, "conv", f"320ch 32² {form} r=8", "lohakit"),
            _get(rows, "conv", f"320ch 32² {form} r=8", "peft_loha"), 0.5)
    add("inference 1 token: lohakit unmerged / merged", _get(rows, "infer", "1 token", "lohakit"),
        _get(rows, "infer", "1 token", "lohakit_merged"), 1.10)
    add("inference 1 token: merged / base", _get(rows, "infer", "1 token", "lohakit_merged"),
        _get(rows, "infer", "1 token", "floor"), 1.0)
    add("memory (GPU target; here CPU peak RSS): lohakit / floor", _get(rows, "memory", "train step r=8", "lohakit"),
        _get(rows, "memory", "train step r=8", "floor"), 1.05, key="peak_mb")
    add("memory r=32 (CPU peak RSS): lohakit / floor", _get(rows, "memory", "train step r=32", "lohakit"),
        _get(rows, "memory", "train step r=32", "floor"), 1.10, key="peak_mb")
    # issue 16's every-rank targets (CPU llama setting): ratio to the floor, and to PEFT LoHa / LyCORIS
    for r, goal in ((4, 1.05), (8, 1.12), (16, 1.30), (32, 1.50), (64, 1.60)):
        case = f"r={r}"
        lk = _get(rows, "llama", case, "lohakit")
        if lk is None or _get(rows, "llama", case, "floor") is None:
            continue
        if r != 8:
            add(f"llama {case} step: lohakit / floor", lk, _get(rows, "llama", case, "floor"), goal)
        add(f"llama {case} step: lohakit / PEFT LoHa (every rank)", lk, _get(rows, "llama", case, "peft_loha"), 0.55)
        add(f"llama {case} step: lohakit / LyCORIS", lk, _get(rows, "llama", case, "lycoris_loha"), 0.5)
    add("conv 3x3 320ch 32² flat r=32: lohakit / PEFT LoHa", _get(rows, "conv", "320ch 32² flat r=32", "lohakit"),
        _get(rows, "conv", "320ch 32² flat r=32", "peft_loha"), 0.6)
    # diffusion suite (SD1 UNet stack with convs, FLUX DiT stack): the r = 8 goals
    for r in rows:
        if r["suite"] != "diffusion" or r["variant"] != "lohakit" or not r["case"].endswith(" r=8"):
            continue
        c = r["case"]
        stack = c.split(" ", 1)[0]
        rank = c.rsplit(" ", 1)[-1]
        for other, goal in (("floor", 1.20), ("peft_loha", 0.5), ("lycoris_loha", 0.6)):
            add(f"diffusion {stack} {rank} step: lohakit / {other}", r, _get(rows, "diffusion", c, other), goal)
    return "\n".join(lines) if len(lines) > 2 else ""


def bar_chart(rows: list[dict], path: str) -> bool:
    """Grouped bars of time ratio vs floor per (suite, case); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r["suite"] in ("linear", "llama", "conv", "infer", "diffusion") and "ms" in r]
    if not timed:
        return False
    groups = list(OrderedDict.fromkeys(f"{r['suite']}\n{r['case']}" for r in timed))
    variants = list(OrderedDict.fromkeys(r["variant"] for r in timed))
    cell = {(f"{r['suite']}\n{r['case']}", r["variant"]): r["ratio"] for r in timed}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)), 4.5))
    for i, v in enumerate(variants):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [cell.get((grp, v), 0.0) for grp in groups], width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("time / frozen-base floor")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("lohakit benchmark: time relative to the frozen-base floor (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(rows: list[dict], path: str, command: str, notes: list[str], date: str | None = None,
                  machine_str: str | None = None) -> None:
    import datetime

    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    png = os.path.splitext(path)[0] + ".png"
    has_png = bar_chart(rows, png)
    parts = [
        "# lohakit benchmark results\n",
        f"- date: {date}",
        f"- machine: {machine_str or machine()}",
        f"- command: `{command}`",
        *[f"- {n}" for n in notes],
        "",
        "Times are medians of interleaved repetitions; ratios are against the frozen-base floor",
        "(the frozen model plus one trainable scalar that scales the input, so backward runs through",
        "every layer). Every variant, the floor included, carries that scalar.",
        "",
    ]
    t = targets(rows)
    if t:
        parts += ["## Targets (issue 6)\n", t, ""]
    parts += ["## Tables\n", table(rows)]
    if has_png:
        parts += [f"![time ratios]({os.path.basename(png)})", ""]
    notes_md = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes_md):  # hand-written analysis kept across runs
        with open(notes_md) as f:
            parts += ["", f.read()]
    with open(path, "w") as f:
        f.write("\n".join(parts))
