"""The plumbing both ``lohakit train`` loops share (text and text-to-image): config mappings,
resume resolution, the metrics log, Ctrl-C as a flag, the progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..core.io import atomic_write_bytes

__all__ = [
    "config_from_dict", "check_fields", "default_cache_dir", "is_int", "is_num", "find_last_checkpoint", "resolve_resume",
    "read_trainer_state", "metrics_log", "interrupt_flag", "progress_bar", "atomic_write_text",
]

C = TypeVar("C")
#: Field name -> (test, what was expected), for :func:`check_fields`.
Checks = dict[str, tuple[Callable[[Any], bool], str]]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lohakit`` (default ``~/.cache/lohakit``): cached demo bases, image latents."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lohakit"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_from_dict(cls: type[C], data: Any, source: str, context: str = "") -> C:
    """``cls(**data)`` for a config dataclass (dashes read as underscores), then ``validate(source)``.

    Raises:
        ValueError: ``data`` is not a mapping, or has keys ``cls`` does not know (all valid ones listed).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a mapping of keys to values, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}{context}; valid keys are {sorted(names)}")
    cfg = cls(**data)
    cfg.validate(source)  # type: ignore[attr-defined]
    return cfg


def check_fields(cfg: Any, checks: Checks, source: str) -> None:
    """Raise ``ValueError`` naming the first field whose value fails its test."""
    for name, (ok, expected) in checks.items():
        v = getattr(cfg, name)
        if not ok(v):
            raise ValueError(f"{source}: '{name}' must be {expected}, got {v!r}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` with the highest step in ``output_dir``, or None."""
    d = Path(output_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint-<step>`` or a save's temporary ``.checkpoint-<step>.tmp``."""
    return bool(_CKPT_RE.match(name)) or name.startswith(".checkpoint-")


def resolve_resume(resume: bool | str, out: Path) -> Path | None:
    """The checkpoint ``--resume`` means: the last one in ``out`` (True), one named, or the last inside one named."""
    if resume is False or resume == "":
        return None
    if resume is True:
        ckpt = find_last_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in output directory {str(out)!r}")
        return ckpt
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        last = find_last_checkpoint(p)
        if last is None:
            raise FileNotFoundError(f"--resume {str(p)!r}: not a lohakit checkpoint (no trainer_state.json) and no checkpoint inside")
        p = last
    return p


def read_trainer_state(resume_dir: Path, max_steps: int) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, refused when unreadable or when nothing is left to train."""
    try:
        state = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {str(resume_dir)!r}: trainer_state.json cannot be read ({e})") from None
    done = state.get("step") if isinstance(state, dict) else None
    if not is_int(done):
        raise ValueError(f"checkpoint {str(resume_dir)!r}: trainer_state.json has no step")
    if max_steps <= done:
        raise ValueError(
            f"--max-steps {max_steps} is not above the step of {resume_dir.name} ({done}): nothing left to train; "
            f"give --max-steps {done + 1} or more to continue"
        )
    return state


def metrics_log(out: Path, start_step: int, main: bool) -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """``(records so far, log)``: ``metrics.jsonl`` cut back to ``start_step`` (a resume), then appended to."""
    metrics: list[dict[str, Any]] = []
    path = out / "metrics.jsonl"
    if main and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else None
            if rec is not None and rec.get("step", 0) <= start_step:
                metrics.append(rec)
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in metrics))

    def log(rec: dict[str, Any]) -> None:
        metrics.append(rec)
        if main:
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    return metrics, log


@contextlib.contextmanager
def interrupt_flag() -> Iterator[dict[str, bool]]:
    """Inside, the first Ctrl-C sets ``flag["stop"]`` (the loop checkpoints and stops); a second one
    interrupts as usual. The previous handler is restored on exit (main thread only)."""
    flag = {"stop": False}
    old: Any = None

    def on_sigint(signum: int, frame: Any) -> None:
        flag["stop"] = True
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        old = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        if main_thread and old is not None:
            signal.signal(signal.SIGINT, old)


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar of optimiser steps (None without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="train", disable=not enabled, dynamic_ncols=True)
