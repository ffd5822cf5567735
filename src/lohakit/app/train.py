"""``lohakit train``: fine-tune a model with a LoHa adapter on local text.

One function, :func:`train`, driven by a :class:`TrainConfig` (from a YAML/JSON/TOML file,
flags, or Python). accelerate places the model, runs mixed precision and multi-process (DDP)
training; the data order is a pure function of ``(seed, step)`` (see :mod:`lohakit.app.textdata`),
so ``--resume`` continues exactly where a run stopped and N processes with per-process batch
``B`` train like one process with batch ``N·B``.

Outputs in ``output_dir``::

    checkpoint-<step>/      adapter_config.json, adapter_model.safetensors (PEFT format),
                            optimizer.safetensors, trainer_state.json (step, scheduler, RNG,
                            base-model fingerprint)
    adapter_config.json     the final adapter (PEFT format), also
    adapter_model.safetensors
    metrics.jsonl           one JSON object per step / evaluation
    loss_curve.png          train and eval loss against step
    train_config.json       the resolved configuration

Every check on the inputs runs before anything is written: a bad input leaves the output
directory as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import LoHaConfig
from ..core.io import load_state_dict, save_state_dict
from ..core.model import LoHaModel
from .runs import (
    atomic_write_text as _atomic_write_text, check_fields, config_from_dict, find_last_checkpoint, interrupt_flag,
    is_checkpoint_name, is_int, is_num, metrics_log, progress_bar, read_trainer_state, resolve_resume,
)
from .textdata import CausalLMData, ClassificationData, check_readable, load_tokenizer, read_records

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "load_config_file", "find_last_checkpoint", "base_fingerprint", "load_base_model", "TrainInterrupted"]

TASKS = ("causal-lm", "seq-cls")
SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: Weight files of a transformers model directory (any one is enough).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Files lohakit train writes at the top of output_dir (removed by --overwrite, nothing else is).
_ARTEFACTS = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "train_config.json")
#: Heads trained in full for sequence classification (PEFT's defaults for SEQ_CLS).
_CLS_HEADS = ("score", "classifier")


class TrainInterrupted(Exception):
    """Raised by :func:`train` after it saved a checkpoint on Ctrl-C (or a ``should_stop`` hook)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainConfig:
    """Everything ``lohakit train`` needs (the keys of a config file; flags use dashes).

    Args:
        model: A transformers model directory (config.json + weights) or an import path
            ``package.module:callable`` returning an ``nn.Module`` (called with ``model_kwargs``).
        data: Training text: .txt, .jsonl (``text_field``) or .csv (column ``text_field``).
        output_dir: Where checkpoints, metrics and the final adapter go.
        task: ``"causal-lm"`` or ``"seq-cls"`` (labels from ``label_field``).
        loha: LoHaConfig fields, e.g. ``{"r": 8, "alpha": 16, "target_modules": ["q_proj"]}``.
        eval_data: Held-out file; default: the last ``eval_fraction`` of ``data``.
        batch_size: Samples per process per micro-step.
        grad_accum: Micro-steps per optimiser step.
        max_steps: Optimiser steps in total.
        lr: AdamW learning rate; None: :func:`default_lr` of the model's width (measured for LoHa).
        weight_decay, warmup_steps, lr_scheduler, max_grad_norm: The rest of the AdamW schedule.
        eval_every, eval_batches: Evaluate every N steps on at most this many batches.
        save_every: Checkpoint every N steps (and always at the end).
        resume: ``True`` (latest checkpoint in output_dir) or a checkpoint directory.
        overwrite: Replace lohakit's files in an existing output_dir.
        mixed_precision: ``auto`` (bf16 on a GPU that supports it, else fp32), no, bf16, fp16.
        cpu: Force the CPU even when a GPU is present.
        progress: Show the tqdm bar.
        fsdp: Shard the model with torch's FSDP2 (``fully_shard``: each decoder layer, then the
            root) instead of DDP when several processes run; checkpoints gather the shards, so
            they are the same files as without it.
    """

    model: str | None = None
    data: str | None = None
    output_dir: str | None = None
    task: str = "causal-lm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loha: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None
    eval_fraction: float = 0.1
    text_field: str = "text"
    label_field: str = "label"
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_batches: int = 20
    save_every: int = 100
    seed: int = 0
    mixed_precision: str = "auto"
    cpu: bool = False
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True
    fsdp: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> "TrainConfig":
        """Build from a mapping; an unknown key raises ``ValueError`` listing the valid keys."""
        return config_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "train config") -> None:
        """Raise ``ValueError`` naming the field when a value is missing or out of range."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{source}: '{name}' is required")
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "task": (lambda v: v in TASKS, f"one of {list(TASKS)}"),
            "lr_scheduler": (lambda v: v in SCHEDULERS, f"one of {list(SCHEDULERS)}"),
            "mixed_precision": (lambda v: v in MIXED_PRECISION, f"one of {list(MIXED_PRECISION)}"),
            "seq_len": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
            "batch_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
            "grad_accum": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
            "max_steps": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
            "warmup_steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
            "eval_every": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: only at the end)"),
            "eval_batches": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
            "save_every": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: only at the end)"),
            "seed": (lambda v: _is_int(v), "an int"),
            "lr": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number (or null: chosen from the model's width)"),
            "weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
            "max_grad_norm": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: no clipping)"),
            "eval_fraction": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
            "loha": (lambda v: isinstance(v, dict), "a mapping of LoHaConfig fields"),
            "model_kwargs": (lambda v: isinstance(v, dict), "a mapping"),
            "resume": (lambda v: isinstance(v, (bool, str)), "true/false or a checkpoint directory"),
            "fsdp": (lambda v: isinstance(v, bool), "true or false"),
        }
        check_fields(self, checks, source)


_is_int, _is_num = is_int, is_num


# ------------------------------------------------------------------------------------------
# Config files
# ------------------------------------------------------------------------------------------
def _load_yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - yaml is an install extra
        raise ImportError("reading a YAML config needs pyyaml: pip install 'lohakit[cli]'") from e
    return yaml.safe_load(text)


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ImportError:  # pragma: no cover - python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


#: suffix -> parser(text)
_CONFIG_PARSERS: dict[str, Callable[[str], Any]] = {
    ".yaml": _load_yaml,
    ".yml": _load_yaml,
    ".json": json.loads,
    ".toml": _load_toml,
}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML/JSON/TOML training config into a dict (not yet validated)."""
    p = Path(path)
    if p.suffix.lower() not in _CONFIG_PARSERS:
        raise ValueError(f"config file {str(p)!r}: unsupported type {p.suffix!r}; expected .yaml, .yml, .json or .toml")
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        data = _CONFIG_PARSERS[p.suffix.lower()](text)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(p)!r} cannot be read ({e})") from None
    except Exception as e:  # parser errors of three libraries
        raise ValueError(f"config file {str(p)!r} cannot be parsed: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


def _model_dir_checks(d: Path) -> dict[str, Any]:
    if not d.is_dir():
        raise ValueError(f"model {str(d)!r} is a file, expected a transformers model directory")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model directory {str(d)!r} has no config.json")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"model directory {str(d)!r} has no weights (expected one of {list(WEIGHT_FILES)})")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None


def model_dir_config(model: str) -> dict[str, Any] | None:
    """The parsed config.json when ``model`` is a directory (validated), else None (import path)."""
    p = Path(model)
    if p.exists():
        return _model_dir_checks(p)
    if not _IMPORT_PATH.match(model):
        raise FileNotFoundError(f"model {model!r} is neither an existing directory nor an import path 'package.module:callable'")
    return None


#: config keys holding a transformer's width (the first one present wins).
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
#: The default learning rate is DEFAULT_LR_WIDTH / width, capped at DEFAULT_LR_MAX (see default_lr).
DEFAULT_LR_WIDTH = 6.0
DEFAULT_LR_MAX = 3e-2
DEFAULT_LR_UNKNOWN_WIDTH = 1e-2


def default_lr(model_config: dict[str, Any] | None) -> float:
    """lohakit train's learning rate for LoHa when none is given: ``min(3e-2, 6 / width)``.

    Measured (AdamW, linear decay, r=8, alpha=8, against PEFT LoRA r=16 at the same parameter
    count; README "Learning rate"): LoHa's best rate was about 3x LoRA's on both tasks, 3e-2 at
    widths 128 and 256, and the best rates fell with the width (LoRA 3e-2 -> 1e-2, LoHa's
    tolerance 1e-1 -> 3e-2), as Adam's usually do. ``6 / width`` meets the measured optimum at
    256, is capped at the measured 3e-2 below, and gives 1.5e-3 at width 4096, about 3x the
    2e-4 - 5e-4 common for LoRA there (an extrapolation, not a measurement). Width unknown: 1e-2.
    """
    for key in _WIDTH_KEYS:
        v = (model_config or {}).get(key)
        if _is_int(v) and v > 0:
            return min(DEFAULT_LR_MAX, DEFAULT_LR_WIDTH / v)
    return DEFAULT_LR_UNKNOWN_WIDTH


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


#: config keys that bound the sequence length a model accepts (the first one present wins).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def max_positions(model_config: dict[str, Any] | None) -> tuple[str, int] | None:
    """(config key, value) of the longest sequence a model accepts, when its config says."""
    for key in _POSITION_KEYS:
        v = (model_config or {}).get(key)
        if _is_int(v) and v > 0:
            return key, int(v)
    return None


def _check_seq_len(seq_len: int, model_config: dict[str, Any] | None, where: str) -> None:
    found = max_positions(model_config)
    if found is not None and seq_len > found[1]:
        key, limit = found
        raise ValueError(f"--seq-len {seq_len} is longer than the model accepts: {where} has {key} = {limit}; use --seq-len {limit} or less")


def load_base_model(model: str, task: str = "causal-lm", num_labels: int | None = None, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Load a transformers directory (``AutoModelForCausalLM`` / ``...SequenceClassification``) or call an import path."""
    if Path(model).exists():
        _model_dir_checks(Path(model))
        try:
            import transformers
        except ImportError as e:  # pragma: no cover
            raise ImportError("loading a model directory needs transformers: pip install 'lohakit[cli]'") from e
        auto = {"causal-lm": transformers.AutoModelForCausalLM, "seq-cls": transformers.AutoModelForSequenceClassification}[task]
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if task == "seq-cls" and num_labels is not None:
            kwargs["num_labels"] = num_labels
        try:
            return auto.from_pretrained(model, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"model directory {model!r} cannot be loaded as {task}: {str(e).splitlines()[0]}") from None
    module_name, attr = (model.split(":", 1) if ":" in model else model.rsplit(".", 1))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model import path {model!r} cannot be imported: {e}") from None
    obj = factory(**(model_kwargs or {}))
    if not isinstance(obj, nn.Module):
        raise ValueError(f"model import path {model!r} returned {type(obj).__name__}, expected a torch.nn.Module")
    return obj


def base_fingerprint(model: nn.Module) -> str:
    """A short hash identifying a base model: parameter names, shapes, dtypes and sampled values.

    Cheap for any size (at most 64 values read per tensor); two different base models (another
    architecture, or the same one with other weights) get different fingerprints.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 32)
            sample = torch.cat([flat[:32], flat[::step][:32]]).to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        state[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                key = f"{idx}.{k}"
                tensors[key] = v.detach().to("cpu").contiguous()
                state[str(idx)][k] = {"__tensor__": key}
            else:
                state[str(idx)][k] = v
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {
        int(idx): {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for k, v in st.items()}
        for idx, st in meta["state"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective), any other tensor as is."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def _full_optimizer_state(sd: dict[str, Any]) -> dict[str, Any]:
    """An FSDP2 optimizer state_dict with every sharded state gathered (every rank calls, same order)."""
    state = {idx: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()} for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _shard_optimizer_state(sd: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The reverse: full states (from a checkpoint) cut into the shards of the sharded ``params``."""
    from torch.distributed.tensor import distribute_tensor

    state: dict[Any, Any] = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        mesh = getattr(p, "device_mesh", None)
        state[idx] = {
            k: distribute_tensor(v.to(p.dtype), mesh, p.placements)
            if mesh is not None and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if torch.is_tensor(x):
        return x.tolist()
    return x


def _params_digest(params: list[torch.Tensor]) -> str:
    """sha256 of the trainable tensors' bytes: equal on every rank when DDP keeps the replicas in sync."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------
def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not torch.is_tensor(logits):
        raise ValueError(f"the model returned {type(out).__name__} without logits; it must return logits or an object with .logits")
    return logits


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, number of predicted tokens / samples, logits) for one batch.

    Causal LM: cross entropy of logits[:, t] against input_ids[:, t+1] over attended positions.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = _logits(out)
    if task == "causal-lm":
        shift = logits[:, :-1].float()  # (B, L-1, V)
        target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, L-1)
        n = (target != -100).sum()
        loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100)
        return loss, n, logits
    labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels), torch.tensor(labels.numel(), device=labels.device), logits


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output directory {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} already exists and is not empty; pass --overwrite to replace it or --resume to continue")


def _clear_artefacts(out: Path) -> None:
    """Remove only the files lohakit train writes (``--overwrite``); anything else stays."""
    for p in out.iterdir():
        if is_checkpoint_name(p.name):
            shutil.rmtree(p)
        elif p.name in _ARTEFACTS:
            p.unlink()


def _default_mixed_precision(choice: str, cpu: bool) -> str:
    if choice != "auto":
        return choice
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _make_accelerator(cfg: TrainConfig, find_unused: bool) -> Any:
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError as e:  # pragma: no cover
        raise ImportError("lohakit train needs accelerate: pip install 'lohakit[cli]'") from e
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # several runs in one process (tests, demo)
    # accelerate only sets up multi-process CPU training (gloo) when told cpu=True
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(
        cpu=cfg.cpu or not has_gpu,
        mixed_precision=_default_mixed_precision(cfg.mixed_precision, cfg.cpu),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )


def _classification_heads(model: nn.Module) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [h for h in _CLS_HEADS if h in names]


def _plot(metrics: list[dict[str, Any]], path: Path, title: str = "lohakit train") -> None:
    """Write the loss curve PNG (train loss per step, eval loss per evaluation)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        logger.warning("matplotlib is not installed: no loss curve written")
        return
    tr = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    ev = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1.2)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _build_data(cfg: TrainConfig, tok: Any) -> CausalLMData | ClassificationData:
    label_field = cfg.label_field if cfg.task == "seq-cls" else None
    train_recs = read_records(cfg.data, cfg.text_field, label_field)
    eval_recs = read_records(cfg.eval_data, cfg.text_field, label_field) if cfg.eval_data else None
    if cfg.task == "causal-lm":
        return CausalLMData.build(
            [r["text"] for r in train_recs], tok, cfg.seq_len,
            eval_texts=[r["text"] for r in eval_recs] if eval_recs is not None else None,
            eval_fraction=cfg.eval_fraction, seed=cfg.seed, source=f"data file {cfg.data!r}",
        )
    return ClassificationData.build(
        train_recs, tok, cfg.seq_len, eval_records=eval_recs, eval_fraction=cfg.eval_fraction,
        seed=cfg.seed, source=f"data file {cfg.data!r}",
    )


def train(
    cfg: TrainConfig, should_stop: Callable[[int], bool] | None = None, echo: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train a LoHa adapter as ``cfg`` says; return a summary.

    Args:
        cfg: The configuration (validated here).
        should_stop: Called after every optimiser step with the step number; returning True
            acts like Ctrl-C (checkpoint, then :class:`TrainInterrupted`).
        echo: Where the main process's start lines go (the banner: model, trainable share,
            tokenizer or bytes, samples; "resumed from checkpoint-N"); default: the logger.

    Returns:
        ``{"step", "train_loss", "eval_loss", "eval_ppl", "eval_accuracy", "output_dir",
        "trainable_params", "total_params", "checkpoint"}``.

    Raises:
        ValueError / FileNotFoundError / FileExistsError / PermissionError: bad input,
            detected before anything is written.
        TrainInterrupted: after saving a checkpoint on SIGINT or ``should_stop``.
    """
    cfg.validate()
    out = Path(cfg.output_dir)  # type: ignore[arg-type]
    # ---------------------------------------------------------------- validate every input
    check_readable(cfg.data)  # type: ignore[arg-type]
    if cfg.eval_data:
        check_readable(cfg.eval_data, "eval data file")
    model_cfg = model_dir_config(cfg.model)  # type: ignore[arg-type]
    if model_cfg is not None:
        _check_seq_len(cfg.seq_len, model_cfg, f"{cfg.model}/config.json")
    resume_dir = resolve_resume(cfg.resume, out)
    if resume_dir is None:
        _check_output_dir(out, cfg.overwrite)
    state: dict[str, Any] | None = None
    if resume_dir is not None:
        state = read_trainer_state(resume_dir, cfg.max_steps)
    eos = model_cfg.get("eos_token_id") if model_cfg else None
    tok = load_tokenizer(cfg.model if model_cfg is not None else None, eos_id=eos if isinstance(eos, int) else None)
    data = _build_data(cfg, tok)
    num_labels = data.num_labels if isinstance(data, ClassificationData) else None
    loha_dict = dict(cfg.loha)
    loha_cfg = LoHaConfig.from_dict(loha_dict, source="train config 'loha'")
    if model_cfg is not None and model_cfg.get("vocab_size", 1 << 62) < tok.vocab_size:
        raise ValueError(f"model {cfg.model!r} has vocab_size {model_cfg['vocab_size']} but its tokenizer ({tok.name}) needs {tok.vocab_size}")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    base = load_base_model(cfg.model, cfg.task, num_labels, cfg.model_kwargs)  # type: ignore[arg-type]
    if model_cfg is None and getattr(base, "config", None) is not None and hasattr(base.config, "to_dict"):
        _check_seq_len(cfg.seq_len, base.config.to_dict(), f"the config of {cfg.model}")
    fingerprint = base_fingerprint(base)
    if state is not None and state.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"checkpoint {str(resume_dir)!r} was trained on another base model "
            f"({state.get('base_model')!r}, fingerprint {state.get('base_fingerprint')}); "
            f"the current base {cfg.model!r} has fingerprint {fingerprint}"
        )
    if cfg.task == "seq-cls":
        if getattr(getattr(base, "config", None), "pad_token_id", 0) is None:
            base.config.pad_token_id = tok.pad_id
        if loha_cfg.modules_to_save is None:
            loha_cfg.modules_to_save = _classification_heads(base) or None
    if resume_dir is not None:
        peft = LoHaModel.from_pretrained(base, str(resume_dir), is_trainable=True)
    else:
        peft = LoHaModel(base, loha_cfg)
    trainable, total = peft.get_nb_trainable_parameters()

    # ---------------------------------------------------------------- distributed set-up
    needs_unused = loha_cfg.module_dropout > 0
    acc = _make_accelerator(cfg, find_unused=needs_unused)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    acc.wait_for_everyone()  # every rank validated its inputs before anyone writes
    created = not out.exists()
    say = echo if echo is not None else logger.info
    try:
        if main:
            if resume_dir is None and out.is_dir() and cfg.overwrite:
                _clear_artefacts(out)
            out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2, default=str))
        acc.wait_for_everyone()

        global_batch = cfg.batch_size * world
        sharded = cfg.fsdp and world > 1
        if cfg.fsdp and not sharded:
            logger.warning("--fsdp with a single process: training unsharded")
        if sharded:
            from ..integrations.fsdp import shard_loha_model

            shard_loha_model(peft)  # before the optimizer: it must hold the sharded parameters
        params = [p for p in peft.parameters() if p.requires_grad]
        lr = cfg.lr if cfg.lr is not None else default_lr(model_cfg or _config_dict(base))
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps))
        start_step = 0
        if state is not None:
            opt_tensors = load_state_dict(resume_dir / "optimizer.safetensors")
            opt_state = _optimizer_from_files(opt_tensors, state["optimizer"])
            if sharded:
                opt_state = _shard_optimizer_state(opt_state, params)
            optimizer.load_state_dict(opt_state)
            scheduler.load_state_dict(state["scheduler"])
            start_step = int(state["step"])
            if state.get("world_size", world) * state.get("batch_size", cfg.batch_size) != global_batch:
                logger.warning("resuming with another global batch (%s) than the checkpoint's: the data order changes", global_batch)
        if sharded:
            model = peft  # fully_shard replaces DDP; accelerate would wrap it again
        else:
            model, optimizer = acc.prepare(peft, optimizer)
        torch.manual_seed(cfg.seed + 1000 * rank + start_step)
        if state is not None:
            rngs = state.get("rng", [])
            if rank < len(rngs):
                _set_rng_state(rngs[rank])

        metrics, log = metrics_log(out, start_step, main)

        def evaluate(step: int) -> dict[str, Any]:
            model.eval()
            batches = data.eval_batches(cfg.batch_size, cfg.eval_batches)
            tot = torch.zeros(3, dtype=torch.float64, device=acc.device)  # (loss·n, n, correct)
            with torch.no_grad():
                # under FSDP every forward is a collective: each rank runs every batch (no reduction)
                for b in batches if sharded else batches[rank::world]:
                    b = {k: v.to(acc.device) for k, v in b.items()}
                    loss, n, logits = _batch_loss(model, b, cfg.task)
                    tot[0] += loss.double() * n
                    tot[1] += n
                    if cfg.task == "seq-cls":
                        tot[2] += (logits.argmax(-1) == b["labels"]).sum()
            model.train()
            if world > 1 and not sharded:
                tot = acc.reduce(tot, reduction="sum")
            if tot[1] == 0:
                return {}
            rec: dict[str, Any] = {"step": step, "eval_loss": float(tot[0] / tot[1])}
            if cfg.task == "causal-lm":
                rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 700.0))
            else:
                rec["eval_accuracy"] = float(tot[2] / tot[1])
            log(rec)
            return rec

        def save_checkpoint(step: int, reason: str) -> Path:
            rng = [_rng_state()]
            digest = [_params_digest([_full(p) for p in params] if sharded else params)]
            opt_sd = _full_optimizer_state(optimizer.state_dict()) if sharded else optimizer.state_dict()
            if world > 1:
                from accelerate.utils import gather_object

                rng = gather_object(rng)
                digest = gather_object(digest)
            final = out / f"checkpoint-{step}"
            tmp = out / f".checkpoint-{step}.tmp"
            if main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            if sharded:
                from ..integrations.fsdp import save_pretrained_sharded

                save_pretrained_sharded(peft, str(tmp), is_main_process=main)  # every rank gathers
            if main:
                if not sharded:
                    acc.unwrap_model(model).save_pretrained(str(tmp))
                opt_tensors, opt_meta = _optimizer_to_files(opt_sd)
                save_state_dict(opt_tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
                st = {
                    "step": step,
                    "reason": reason,
                    "base_model": cfg.model,
                    "base_fingerprint": fingerprint,
                    "world_size": world,
                    "batch_size": cfg.batch_size,
                    "scheduler": _jsonable(scheduler.state_dict()),
                    "optimizer": _jsonable(opt_meta),
                    "rng": rng,
                    "replica_digests": digest,
                    "label_names": getattr(data, "label_names", None),
                    "config": cfg.to_dict(),
                }
                (tmp / "trainer_state.json").write_text(json.dumps(st, default=str), encoding="utf-8")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            acc.wait_for_everyone()
            return final

        if main:
            for line in _banner(cfg, base, peft, tok, data, trainable, total, world, lr):
                say(line)
            if resume_dir is not None:
                say(f"resumed from {resume_dir.name} (step {start_step} of {cfg.max_steps})")
        if start_step == 0:  # the loss curve starts at the base model (ΔW = 0 at init)
            first = evaluate(0)
            if main and first:
                say(_eval_line(first))

        # ---------------------------------------------------------------- loop
        interrupts = contextlib.ExitStack()
        stop = interrupts.enter_context(interrupt_flag())  # Ctrl-C: checkpoint, then stop
        bar = progress_bar(cfg.max_steps, start_step, main and cfg.progress)
        model.train()
        step = start_step
        last_loss = float("nan")
        last_eval: dict[str, Any] = {}
        last_ckpt: Path | None = None
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
                tokens = torch.zeros((), dtype=torch.float64, device=acc.device)
                for micro in range(cfg.grad_accum):
                    b = data.batch(step, micro, cfg.grad_accum, global_batch, rank, world)
                    b = {k: v.to(acc.device) for k, v in b.items()}
                    sync = micro == cfg.grad_accum - 1
                    if sharded:
                        model.set_requires_gradient_sync(sync)  # FSDP2's no_sync
                        ctx = contextlib.nullcontext()
                    else:
                        ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
                    with ctx:
                        loss, _, _ = _batch_loss(model, b, cfg.task)
                        if needs_unused:  # module_dropout may skip every adapter: keep them in the graph (grad 0)
                            loss = loss + 0.0 * sum(p.sum() for p in params)
                        acc.backward(loss / cfg.grad_accum)
                    step_loss += loss.detach().double() / cfg.grad_accum
                    tokens += b["attention_mask"].sum()
                if cfg.max_grad_norm > 0:
                    if sharded:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    else:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if world > 1:
                    step_loss = acc.reduce(step_loss, reduction="mean")
                    tokens = acc.reduce(tokens, reduction="sum")
                dt = time.perf_counter() - t0
                last_loss = float(step_loss)
                tps = float(tokens) / max(dt, 1e-9)
                log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tps, 1)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:,.0f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    last_eval = evaluate(step) or last_eval
                    if main and last_eval and bar is not None:
                        bar.write(_eval_line(last_eval))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    last_ckpt = save_checkpoint(step, "periodic")
                want = stop["stop"] or (should_stop is not None and should_stop(step))
                if world > 1:
                    flag = acc.reduce(torch.tensor(float(want), device=acc.device), reduction="sum")
                    want = bool(flag > 0)
                if want and step < cfg.max_steps:
                    ckpt = save_checkpoint(step, "interrupted")
                    if main:
                        _plot(metrics, out / "loss_curve.png")
                    raise TrainInterrupted(step, ckpt)
            last_eval = evaluate(step) or last_eval
            if main and last_eval and bar is not None:
                bar.write(_eval_line(last_eval))
            last_ckpt = save_checkpoint(step, "final")
            if sharded:
                from ..integrations.fsdp import save_pretrained_sharded

                save_pretrained_sharded(peft, str(out), is_main_process=main)
            elif main:
                acc.unwrap_model(model).save_pretrained(str(out))
            if main:
                _plot(metrics, out / "loss_curve.png")
            acc.wait_for_everyone()
        finally:
            if bar is not None:
                bar.close()
            interrupts.close()
            if world == 1:  # leave no accelerate singleton (mixed precision, cpu) behind for the caller
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)
    except TrainInterrupted:
        raise
    except BaseException:
        # a run that failed before its first checkpoint leaves no half-written output directory
        if main and resume_dir is None and out.is_dir() and find_last_checkpoint(out) is None:
            _clear_artefacts(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    return {
        "step": step,
        "train_loss": last_loss,
        "eval_loss": last_eval.get("eval_loss"),
        "eval_ppl": last_eval.get("eval_ppl"),
        "eval_accuracy": last_eval.get("eval_accuracy"),
        "output_dir": str(out),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "trainable_params": trainable,
        "total_params": total,
        "rank": rank,
        "world_size": world,
    }


def _n_samples(data: CausalLMData | ClassificationData) -> tuple[int, int]:
    if isinstance(data, CausalLMData):
        return int(data.train.shape[0]), int(data.eval.shape[0])
    return len(data.train_ids), len(data.eval_ids)


def _banner(
    cfg: TrainConfig, base: nn.Module, model: LoHaModel, tok: Any, data: CausalLMData | ClassificationData,
    trainable: int, total: int, world: int, lr: float,
) -> list[str]:
    """The start lines: what is trained, on what, how."""
    loha = model.peft_config[model.active_adapters[0]]
    n_train, n_eval = _n_samples(data)
    tokens = "UTF-8 bytes (no tokenizer in the model directory)" if tok.name == "bytes" else f"tokenizer {tok.name}"
    unit = f"blocks of {cfg.seq_len} tokens" if isinstance(data, CausalLMData) else f"texts (up to {cfg.seq_len} tokens)"
    pct = 100.0 * trainable / max(total, 1)
    return [
        f"lohakit train: {cfg.model} ({type(base).__name__}), LoHa r={loha.r} alpha={loha.alpha:g} on "
        f"{len(list(model.loha_layers()))} modules: {trainable:,} of {total:,} parameters trainable ({pct:.3f}%)",
        f"data: {n_train} train / {n_eval} eval {unit}, {tokens}",
        f"{cfg.max_steps} steps of {cfg.batch_size * world * cfg.grad_accum} samples "
        f"({world} process{'es' if world > 1 else ''} x batch {cfg.batch_size} x accumulation {cfg.grad_accum}), "
        f"lr {lr:.3g}{' (default for its width; --lr to set)' if cfg.lr is None else ''}",
    ]


def _eval_line(rec: dict[str, Any]) -> str:
    extra = f"ppl {rec['eval_ppl']:.3f}" if "eval_ppl" in rec else f"accuracy {rec.get('eval_accuracy', float('nan')):.3f}"
    return f"step {rec['step']}: eval loss {rec['eval_loss']:.4f}, {extra}"
