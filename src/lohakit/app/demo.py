"""``lohakit demo``: the project's main job, offline, on a CPU, in about a minute or two.

1. Build a small Llama-architecture byte-level language model (transformers ``LlamaForCausalLM``
   from a config: UTF-8 bytes are the tokens, so no tokenizer is downloaded) and pretrain it
   briefly on English prose that ships with Python (``pydoc_data.topics``, the help texts).
   The base model is cached under the user's cache directory and reused by later runs.
2. Adapt it with LoHa to Python source code from the standard library (a real domain shift:
   held-out *files* measure the perplexity on code before and after).
3. When peft is installed, run the same adaptation with PEFT LoRA at the same number of
   trainable parameters (a LoHa branch pair of rank r has 2·r·(in+out) parameters per Linear,
   a LoRA of rank 2r has the same).
4. Save the LoHa adapter (PEFT format), reload it onto a fresh base, merge it into the
   weights and check that merged == unmerged; write the loss-curve PNG.

Every number printed is measured in this run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import LoHaConfig
from ..core.model import LoHaModel
from .runs import default_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "run_demo", "default_cache_dir", "prose_corpus", "code_corpus"]

#: The seven Llama projections adapted by the demo.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of the demo (``quick`` for tests: same steps, far less compute)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    seq_len: int = 128
    batch: int = 12
    pretrain_steps: int = 240
    pretrain_lr: float = 5e-3
    adapt_steps: int = 80
    #: Per-method learning rates, each the best of a small sweep at these sizes (held-out code
    #: perplexity; LoHa over {1e-2, 2e-2, 3e-2}, LoRA over {5e-3, 1e-2, 2e-2}). LoHa's product
    #: parametrisation (ΔW quadratic in the factors, w2_b = 0 at init) wants a larger one.
    loha_lr: float = 3e-2
    lora_lr: float = 2e-2
    rank: int = 4
    alpha: float = 8.0
    eval_blocks: int = 48
    code_train_bytes: int = 600_000
    code_eval_bytes: int = 60_000

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(hidden=48, layers=2, intermediate=96, seq_len=64, batch=8, pretrain_steps=30,
                   adapt_steps=12, eval_blocks=16, code_train_bytes=100_000, code_eval_bytes=10_000)

    def model_config(self) -> dict[str, Any]:
        return dict(vocab_size=256, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    max_position_embeddings=max(256, self.seq_len), bos_token_id=None, eos_token_id=None,
                    pad_token_id=None, tie_word_embeddings=False)


def relative_change(before: float, after: float) -> str:
    """``"3.2% lower"`` / ``"1.0% higher"`` / ``"unchanged"``: the sign read out, never a negative 'lower'."""
    if not math.isfinite(before) or not math.isfinite(after) or before == 0:
        return "change undefined"
    pct = 100.0 * (after - before) / abs(before)
    if round(pct, 1) == 0:
        return "unchanged"
    return f"{abs(pct):.1f}% {'higher' if pct > 0 else 'lower'}"


# ------------------------------------------------------------------------------------------
# Corpora (both ship with Python)
# ------------------------------------------------------------------------------------------
def prose_corpus() -> str:
    """English prose: the pydoc help topics of this Python, concatenated in key order."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def code_corpus(train_bytes: int, eval_bytes: int, per_file: int = 16_384) -> tuple[str, str, list[str], list[str]]:
    """Python source from the standard library: (train text, held-out text, train files, held-out files).

    Modules are taken in sorted order; every 5th one is held out, so the held-out perplexity is
    measured on modules the adapter never saw. At most ``per_file`` bytes come from one module
    (spread over many modules rather than a few large ones); held-out text starts after the
    first quarter of each module (past license headers and imports).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file() and not p.name.startswith("_"))
    train: list[str] = []
    held: list[str] = []
    n_train = n_held = 0
    used_train: list[str] = []
    used_held: list[str] = []
    for i, p in enumerate(files):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if i % 5 == 0:
            if n_held < eval_bytes:
                start = len(text) // 4
                chunk = text[start : start + per_file // 4]
                held.append(chunk)
                used_held.append(p.name)
                n_held += len(chunk.encode("utf-8"))
        elif n_train < train_bytes:
            chunk = text[:per_file]
            train.append(chunk)
            used_train.append(p.name)
            n_train += len(chunk.encode("utf-8"))
        if n_held >= eval_bytes and n_train >= train_bytes:
            break
    if not train or not held:
        raise RuntimeError(f"no Python source found in the standard library at {root}")
    return "\n\n".join(train), "\n\n".join(held), used_train, used_held


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()  # (T,)


def _blocks(stream: torch.Tensor, seq: int, n: int) -> torch.Tensor:
    """The first ``n`` consecutive (seq,) blocks of a byte stream: (n, seq)."""
    n = min(n, stream.numel() // seq)
    return stream[: n * seq].view(n, seq)


def _spread_blocks(stream: torch.Tensor, seq: int, n: int) -> torch.Tensor:
    """``n`` (seq,) blocks evenly spaced over the whole stream: (n, seq)."""
    starts = torch.linspace(0, stream.numel() - seq, n).long().tolist()
    return torch.stack([stream[s : s + seq] for s in starts])


def _random_batch(stream: torch.Tensor, seq: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq, (batch,), generator=gen)  # (B,)
    return torch.stack([stream[s : s + seq] for s in starts.tolist()])  # (B, L)


# ------------------------------------------------------------------------------------------
# Training / evaluation helpers
# ------------------------------------------------------------------------------------------
def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy: logits[:, t] predicts ids[:, t+1]."""
    logits = model(input_ids=ids).logits  # (B, L, 256)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-byte cross entropy) over ``blocks`` (N, L)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, blocks.shape[0], batch):
        ids = blocks[s : s + batch]  # (b, L)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(_lm_loss(model, ids)) * n
        count += n
    model.train(was)
    return math.exp(total / count)


def _fit(
    model: nn.Module,
    stream: torch.Tensor,
    steps: int,
    lr: float,
    s: DemoSettings,
    seed: int,
    desc: str,
    eval_fn: Callable[[], float] | None = None,
    eval_every: int = 0,
) -> tuple[list[float], list[tuple[int, float]], float]:
    """AdamW with linear warm-up/decay on random windows; (losses, [(step, eval ppl)], seconds)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, max(0.05, (steps - i) / (steps - warm + 1))))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for i in bar:
        ids = _random_batch(stream, s.seq_len, s.batch, gen)  # (B, L)
        loss = _lm_loss(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += ids.numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
        if eval_fn is not None and eval_every and (i + 1) % eval_every == 0 and i + 1 < steps:
            evals.append((i + 1, eval_fn()))
    bar.close()
    return losses, evals, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# The cached base model
# ------------------------------------------------------------------------------------------
def _recipe(s: DemoSettings, seed: int, prose: str) -> dict[str, Any]:
    return {
        "kind": "lohakit-demo-base",
        "version": 1,
        "model": s.model_config(),
        "pretrain": {"steps": s.pretrain_steps, "lr": s.pretrain_lr, "seq_len": s.seq_len, "batch": s.batch, "seed": seed},
        "corpus_sha256": hashlib.sha256(prose.encode("utf-8")).hexdigest()[:16],
        "prose_held_out_bytes": s.eval_blocks * s.seq_len,
        "torch": torch.__version__.split("+")[0],
    }


def load_or_build_base(
    cache_dir: Path, s: DemoSettings, seed: int, prose: torch.Tensor, prose_text: str, rebuild: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained base from the cache when its recipe matches, else pretrain and cache it.

    Returns ``(model, info)`` with info ``{"cached": bool, "path", "losses", "seconds"}``.
    The cache is written to a temporary directory and renamed into place, so an interrupted
    run never leaves a half-written base behind.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = _recipe(s, seed, prose_text)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"demo-base-{key}"
    if not rebuild and (path / "lohakit_demo_recipe.json").is_file():
        try:
            saved = json.loads((path / "lohakit_demo_recipe.json").read_text(encoding="utf-8"))
            if saved.get("recipe") == recipe:
                model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
                return model, {"cached": True, "path": path, "losses": saved.get("losses", []), "seconds": 0.0}
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning("cached demo base at %s is unusable (%s); pretraining again", path, e)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**s.model_config()))
    losses, _, secs = _fit(model, prose, s.pretrain_steps, s.pretrain_lr, s, seed, "pretrain (prose)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=cache_dir))
    try:
        model.save_pretrained(str(tmp))
        (tmp / "lohakit_demo_recipe.json").write_text(json.dumps({"recipe": recipe, "losses": losses}), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    return model, {"cached": False, "path": path, "losses": losses, "seconds": secs}


# ------------------------------------------------------------------------------------------
# LoRA baseline
# ------------------------------------------------------------------------------------------
def _lora_model(base: nn.Module, rank: int, alpha: float) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LLAMA_PROJECTIONS, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft calls transformers APIs that warn about their own deprecations
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, cfg)


# ------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------
def _smooth(xs: list[float], k: int = 5) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _plot(path: Path, pre: list[float], runs: dict[str, dict[str, Any]], s: DemoSettings) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve written (pip install 'lohakit[cli]')")
        return
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    if pre:
        a0.plot(range(1, len(pre) + 1), pre, color="0.75", lw=0.8, label="per step")
        a0.plot(range(1, len(pre) + 1), _smooth(pre), color="C0", lw=1.6, label="5-step mean")
        a0.legend()
    else:
        a0.text(0.5, 0.5, "no pretraining curve recorded", ha="center", va="center", transform=a0.transAxes)
    a0.set_title("1. pretraining the byte-level Llama on English prose")
    a0.set_xlabel("step")
    a0.set_ylabel("train loss (nats / byte)")
    a0.grid(alpha=0.3)
    colors = {"LoHa": "C3", "LoRA": "C2"}
    for name, r in runs.items():
        c = colors.get(name, None)
        xs = range(1, len(r["losses"]) + 1)
        a1.plot(xs, r["losses"], color=c, lw=0.7, alpha=0.35)
        a1.plot(xs, _smooth(r["losses"]), color=c, lw=1.6, label=f"{name} train ({r['params']:,} params)")
        ev = [(0, r["ppl_before"])] + r["evals"] + [(len(r["losses"]), r["ppl_after"])]
        a1.plot([e[0] for e in ev], [math.log(e[1]) for e in ev], "o--", color=c, lw=1.2, ms=4,
                label=f"{name} held-out code (ppl {r['ppl_before']:.2f} → {r['ppl_after']:.2f})")
    a1.set_title("2. adapting to Python source (stdlib), base frozen")
    a1.set_xlabel("step")
    a1.set_ylabel("loss (nats / byte)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"lohakit demo: Llama {s.layers}x{s.hidden}, bytes as tokens, rank {s.rank}", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------
def run_demo(
    cache_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    quick: bool = False,
    with_lora: bool = True,
    rebuild_base: bool = False,
    seed: int = 0,
    settings: DemoSettings | None = None,
    echo: Callable[[str], None] = print,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the demo; print a report through ``echo`` and return every figure as a dict.

    ``threads``: torch CPU threads during the run (default 1, see below; None keeps the current
    setting); the previous setting is restored afterwards.

    Raises:
        RuntimeError: When the reloaded adapter or the merged model disagrees with the trained one.
    """
    if importlib.util.find_spec("transformers") is None:  # the base is a transformers LlamaForCausalLM
        raise ImportError("lohakit demo needs transformers (and tqdm, matplotlib): pip install 'lohakit[cli]'")
    t_start = time.perf_counter()
    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    # At these sizes (128-wide matrices) one thread is as fast as two on a quiet machine and many
    # times faster on a busy one, where OpenMP threads wait for each other: measured 60-110 ms vs
    # 280-1500 ms per pretraining step on 2 shared cores.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads if threads else threads_before, threads_before)))
    try:
        return _run(s, cache_dir, output_dir, quick, with_lora, rebuild_base, seed, echo, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(
    s: DemoSettings,
    cache_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike | None,
    quick: bool,
    with_lora: bool,
    rebuild_base: bool,
    seed: int,
    echo: Callable[[str], None],
    t_start: float,
) -> dict[str, Any]:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = Path(output_dir) if output_dir is not None else cache / ("demo-output-quick" if quick else "demo-output")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    echo(f"lohakit demo: torch {torch.__version__}, {torch.get_num_threads()} of {os.cpu_count()} CPU threads, Python {platform.python_version()}")
    prose_text = prose_corpus()
    prose = _bytes_tensor(prose_text)
    code_train_text, code_eval_text, train_files, eval_files = code_corpus(s.code_train_bytes, s.code_eval_bytes)
    code_train = _bytes_tensor(code_train_text)
    code_eval = _spread_blocks(_bytes_tensor(code_eval_text), s.seq_len, s.eval_blocks)  # (N, L)
    held = s.eval_blocks * s.seq_len  # the last bytes of the prose are never pretrained on
    prose_eval = _blocks(prose[-held:], s.seq_len, s.eval_blocks)  # (N, L)
    prose = prose[:-held]
    echo(f"data: {prose.numel():,} bytes of English prose (pydoc topics); Python code: {code_train.numel():,} bytes "
         f"from {len(train_files)} stdlib modules for training, {code_eval.numel():,} bytes from {len(eval_files)} other "
         f"modules held out")

    # ---- 1. the base
    base, info = load_or_build_base(cache, s, seed, prose, prose_text, rebuild=rebuild_base)
    n_base = sum(p.numel() for p in base.parameters())
    if info["cached"]:
        echo(f"[1] base model: loaded from cache {info['path']} ({n_base:,} parameters)")
    else:
        echo(f"[1] base model: Llama {s.layers} layers x {s.hidden} hidden, {n_base:,} parameters, byte-level; "
             f"pretrained {s.pretrain_steps} steps on prose in {info['seconds']:.1f}s "
             f"(loss {info['losses'][0]:.3f} -> {sum(info['losses'][-5:]) / 5:.3f}); cached at {info['path']}")
    base.eval()
    ppl_prose = perplexity(base, prose_eval)
    ppl_code_before = perplexity(base, code_eval)
    echo(f"    base perplexity per byte on held-out text: English prose {ppl_prose:.3f}, Python code {ppl_code_before:.3f}")

    # ---- 2. LoHa
    runs: dict[str, dict[str, Any]] = {}
    torch.manual_seed(seed + 1)
    loha_cfg = LoHaConfig(r=s.rank, alpha=s.alpha, target_modules=list(LLAMA_PROJECTIONS))
    loha = LoHaModel(copy.deepcopy(base), loha_cfg)
    trainable, total = loha.get_nb_trainable_parameters()
    echo(f"[2] LoHa r={s.rank} alpha={s.alpha:g} on {len(list(loha.loha_layers()))} projections: "
         f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    losses, evals, secs = _fit(loha, code_train, s.adapt_steps, s.loha_lr, s, seed + 2, "LoHa (code)",
                               eval_fn=lambda: perplexity(loha, code_eval), eval_every=max(1, s.adapt_steps // 4))
    ppl_after = perplexity(loha, code_eval)
    runs["LoHa"] = {"params": trainable, "losses": losses, "evals": evals, "seconds": secs,
                    "ppl_before": ppl_code_before, "ppl_after": ppl_after, "prose_ppl_after": perplexity(loha, prose_eval)}
    echo(f"    {s.adapt_steps} steps at lr {s.loha_lr:g} in {secs:.1f}s: held-out code perplexity {ppl_code_before:.3f} -> {ppl_after:.3f} "
         f"({relative_change(ppl_code_before, ppl_after)}); prose {ppl_prose:.3f} -> {runs['LoHa']['prose_ppl_after']:.3f}")

    # ---- 3. LoRA at equal parameter count
    if with_lora:
        torch.manual_seed(seed + 1)
        lora = _lora_model(copy.deepcopy(base), 2 * s.rank, 2 * s.alpha)
        if lora is None:
            echo("[3] PEFT LoRA comparison skipped: peft is not installed")
        else:
            lp = lora.get_nb_trainable_parameters()[0]
            l_losses, l_evals, l_secs = _fit(lora, code_train, s.adapt_steps, s.lora_lr, s, seed + 2, "LoRA (code)",
                                             eval_fn=lambda: perplexity(lora, code_eval), eval_every=max(1, s.adapt_steps // 4))
            l_after = perplexity(lora, code_eval)
            runs["LoRA"] = {"params": lp, "losses": l_losses, "evals": l_evals, "seconds": l_secs,
                            "ppl_before": ppl_code_before, "ppl_after": l_after}
            echo(f"[3] PEFT LoRA r={2 * s.rank} alpha={2 * s.alpha:g} (same data and steps, lr {s.lora_lr:g}): trainable {lp:,} parameters "
                 f"({'equal to' if lp == trainable else 'vs'} LoHa's {trainable:,}); {s.adapt_steps} steps in {l_secs:.1f}s: "
                 f"held-out code perplexity {ppl_code_before:.3f} -> {l_after:.3f} ({relative_change(ppl_code_before, l_after)})")
    else:
        echo("[3] PEFT LoRA comparison skipped (--no-lora)")

    # ---- 4. save, reload, merge
    adapter_dir = out / "loha-adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    loha.save_pretrained(str(adapter_dir))
    loha.eval()
    probe = code_eval[: min(4, code_eval.shape[0])]  # (4, L)
    with torch.no_grad():
        trained_logits = loha(input_ids=probe).logits  # (4, L, 256)
        reloaded = LoHaModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
        reload_err = float((reloaded(input_ids=probe).logits - trained_logits).abs().max())
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=probe).logits
        merge_err = float((merged_logits - trained_logits).abs().max())
        base_err = float((base(input_ids=probe).logits - trained_logits).abs().max())
    files = sorted(p.name for p in adapter_dir.iterdir())
    size = sum(p.stat().st_size for p in adapter_dir.iterdir())
    echo(f"[4] saved the adapter to {adapter_dir} ({', '.join(files)}; {size / 1024:.1f} KiB)")
    echo(f"    reloaded onto a fresh base: max |reloaded - trained| = {reload_err:.2e}")
    echo(f"    merged into the weights:    max |merged - unmerged| = {merge_err:.2e} "
         f"(the adapter itself moves the logits by up to {base_err:.2f})")
    tol = 1e-4
    ok = reload_err <= tol and merge_err <= tol
    png = out / "loss_curve.png"
    _plot(png, info["losses"], runs, s)
    summary = {
        "settings": dataclasses.asdict(s),
        "base_cached": info["cached"],
        "base_path": str(info["path"]),
        "base_params": n_base,
        "prose_ppl": ppl_prose,
        "code_ppl_before": ppl_code_before,
        "loha": {k: v for k, v in runs["LoHa"].items() if k != "losses"},
        "lora": {k: v for k, v in runs["LoRA"].items() if k != "losses"} if "LoRA" in runs else None,
        "trainable_params": trainable,
        "total_params": total,
        "reload_max_abs_err": reload_err,
        "merge_max_abs_err": merge_err,
        "adapter_dir": str(adapter_dir),
        "loss_curve": str(png),
        "seconds": time.perf_counter() - t_start,
        "ok": ok,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    echo(f"    loss curve: {png}; all figures: {out / 'demo_summary.json'}")
    if not ok:
        raise RuntimeError(f"adapter round trip failed: reload error {reload_err:.3e}, merge error {merge_err:.3e} (tolerance {tol:g})")
    verdict = ""
    if "LoRA" in runs:
        d = runs["LoRA"]["ppl_after"] - ppl_after
        verdict = f"; LoHa {'beats' if d > 0 else 'trails'} LoRA by {abs(d):.3f} perplexity at equal size"
    echo(f"OK in {summary['seconds']:.0f}s: merged == unmerged (float32, tol {tol:g}){verdict}")
    return summary
