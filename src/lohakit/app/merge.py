"""``lohakit merge``: bake a LoHa adapter into a transformers model and write the merged directory.

W ← W + s·(w1a w1b) ⊙ (w2a w2b) for every adapted module (computed in float32, cast once to W's
dtype), then ``save_pretrained(max_shard_size=...)``: safetensors shards plus an index, exactly
as transformers writes them, so ``AutoModel.from_pretrained(OUT)`` loads the merged model.

OUT is never lost or mixed (``--overwrite`` included): the whole directory is staged next to OUT
(``.OUT.staged-<id>``) and swapped in by one atomic exchange of the two directories (Linux
``renameat2(RENAME_EXCHANGE)``). Where that is unavailable, OUT is renamed aside
(``.OUT.old-<id>``), the staged directory renamed into place, and the old OUT renamed back if
that fails; after a crash between the two renames the next merge into OUT puts the old one back
first. A file-by-file transaction (:class:`~lohakit.core.io.StagedWrites`) does not fit here: the
set of files changes between saves (one ``model.safetensors`` or shards plus an index, which
transformers reads in that order), so stale files of the old OUT would survive it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["merge_to_dir", "load_transformers_model"]

#: Files copied from the base directory so the merged directory is self-contained.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "added_tokens.json", "chat_template.jinja",
)


def load_transformers_model(model_dir: str | os.PathLike) -> Any:
    """Load a model directory with the class named in its config (``architectures[0]``), else AutoModel."""
    from .train import _model_dir_checks

    cfg = _model_dir_checks(Path(model_dir))
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a transformers model directory needs transformers: pip install 'lohakit[cli]'") from e

    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model directory {str(model_dir)!r} cannot be loaded: {str(e).splitlines()[0]}") from None


_STAGED = ".staged-"
_OLD = ".old-"


def _siblings(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}{kind}"
    try:
        found = [p for p in out.parent.iterdir() if p.name.startswith(prefix) and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _recover(out: Path) -> None:
    """Finish what a crashed merge into ``out`` left: put a set-aside old OUT back, drop stale stagings."""
    olds = _siblings(out, _OLD)
    if olds and not out.exists():
        os.replace(olds.pop(), out)  # the newest set-aside OUT: a crash came between the two renames
    for p in olds + _siblings(out, _STAGED):
        _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, f"cannot swap {b} with the merged directory {a}: {os.strerror(err)}; {b} is unchanged", str(b))


def _sync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if p.is_dir() else 0))
        try:
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
                os.fsync(fd)
        finally:
            os.close(fd)


def _swap_into_place(staged: Path, out: Path) -> None:
    """Make the complete directory ``staged`` be ``out``; on any failure ``out`` stays as it was."""
    if not out.exists():
        os.replace(staged, out)
        return
    if _exchange(staged, out):
        _remove(staged)  # now the old OUT
        return
    old = out.with_name(f".{out.name}{_OLD}{secrets.token_hex(6)}")
    os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old, out)  # put the old OUT back before reporting the failure
        raise
    _remove(old)


def merge_to_dir(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``adapter`` (PEFT LoHa directory) into ``base`` and write a transformers directory at ``out``.

    Returns:
        ``{"out", "merged_modules", "files"}`` (files: safetensors weight files written).

    Raises:
        FileExistsError: ``out`` exists and is not empty, and ``overwrite`` is False.
        FileNotFoundError / ValueError: a missing or unusable base or adapter.
    """
    from ..core.model import LoHaModel

    out_p, adapter_p = Path(out), Path(adapter)
    if out_p.parent.is_dir():
        _recover(out_p)  # first: an OUT set aside by a crashed merge counts as existing
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {str(out_p)!r} already exists; pass --overwrite to replace it")
    if not adapter_p.exists():
        raise FileNotFoundError(f"adapter {str(adapter_p)!r} does not exist")
    if adapter_p.is_file():
        kind = "a kohya/LyCORIS single-file adapter" if adapter_p.suffix == ".safetensors" else "a file"
        raise ValueError(
            f"adapter {str(adapter_p)!r} is {kind}, not a PEFT adapter directory; convert it first: "
            f"lohakit convert {adapter_p} ADAPTER_DIR --to peft --base {base}"
        )
    if not (adapter_p / "adapter_config.json").is_file():
        raise ValueError(f"adapter {str(adapter_p)!r} is not a PEFT adapter directory (no adapter_config.json)")
    if not Path(base).exists():
        raise FileNotFoundError(f"base model directory {str(base)!r} does not exist")
    model = load_transformers_model(base)
    peft = LoHaModel.from_pretrained(model, str(adapter_p))
    n = len(list(peft.loha_layers()))
    merged = peft.merge_and_unload(safe_merge=True)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_p.with_name(f".{out_p.name}{_STAGED}{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        for name in _SIDE_FILES:
            src = Path(base) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        (tmp / "lohakit_merge.json").write_text(
            json.dumps({"base": str(base), "adapter": str(adapter_p), "merged_modules": n}, indent=2), encoding="utf-8"
        )
        files = sorted(p.name for p in tmp.glob("*.safetensors"))
        _sync_tree(tmp)  # the staged files are on disk before they become OUT
        _swap_into_place(tmp, out_p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out_p), "merged_modules": n, "files": len(files)}
