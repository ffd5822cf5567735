"""``lohakit merge``: bake a LoHa adapter into a transformers model and write the merged directory.

W ← W + s·(w1a w1b) ⊙ (w2a w2b) for every adapted module (computed in float32, cast once to W's
dtype), then ``save_pretrained(max_shard_size=...)``: safetensors shards plus an index, exactly
as transformers writes them, so ``AutoModel.from_pretrained(OUT)`` loads the merged model.

OUT is never lost or mixed (``--overwrite`` included): the whole directory is staged next to OUT
(``.OUT.staged-<id>``, id 12 hex digits; a marker file ``.lohakit-staging`` naming the owner
process is written into it first) and swapped in by one atomic exchange of the two directories
(Linux ``renameat2(RENAME_EXCHANGE)``). Where that is unavailable, OUT is renamed aside
(``.OUT.old-<id>``, marked first), the staged directory renamed into place, and the old OUT renamed
back if that fails. The swap runs under the ``flock`` of OUT's directory
(:func:`lohakit.core.io._dir_lock`, the lock of PEFT saves); so does the recovery each merge and
``convert`` runs first (:func:`recover_stagings`): after a crash between the two renames it puts
the old OUT back, and it drops dead stagings. It touches only siblings named exactly as above that
hold a valid marker of a process that is gone (a live one, or one of another host, is left
alone), never a user's ``.OUT.old-backup``. OUT is resolved first: a symlinked OUT keeps its link
(the target is replaced); the current directory, a filesystem root and a mount point are refused.
A file-by-file transaction (:class:`~lohakit.core.io.StagedWrites`) does not fit here: the
set of files changes between saves (one ``model.safetensors`` or shards plus an index, which
transformers reads in that order), so stale files of the old OUT would survive it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Mapping
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


_MARKER = ".lohakit-staging"
_KINDS = ("old", "staged", "convert")


def _new_id() -> str:
    return secrets.token_hex(6)  # 12 lowercase hex digits: the only ids _leftover_pattern accepts


def _leftover_pattern(out: Path) -> re.Pattern[str]:
    """Exactly the sibling names lohakit gives its stagings of ``out`` (``.OUT.<kind>-<12 hex>``)."""
    return re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(_KINDS)})-[0-9a-f]{{12}}")


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of process ``pid`` where /proc tells it, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}


def _write_marker(d: Path) -> None:
    """Mark ``d`` as a lohakit staging of the running process (written complete, then renamed into place)."""
    tmp = d / f"{_MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"lohakit": "staging", **_owner()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / _MARKER)
    with contextlib.suppress(OSError):  # the marker's name is on disk before the staging is used
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_marker(d: Path) -> dict[str, Any] | None:
    """The marker of a real directory ``d`` (no symlinks), or None where there is no valid one."""
    try:
        if d.is_symlink() or not d.is_dir() or (d / _MARKER).is_symlink():
            return None
        info = json.loads((d / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict) or info.get("lohakit") != "staging":
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return info


def _owner_alive(info: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a marker may still be running (True whenever unsure)."""
    pid, start = info["pid"], info.get("start")
    if os.name != "posix" or info.get("host") != socket.gethostname():
        return True  # another machine or container: its processes cannot be checked from here
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # EPERM: alive, someone else's
            pass
    now = _proc_start(pid)
    return not (isinstance(start, int) and now is not None and now != start)  # a reused pid is another process


def _new_staging(out: Path, kind: str) -> Path:
    """A fresh marked staging directory ``.OUT.<kind>-<id>`` next to ``out`` (the marker comes first)."""
    d = out.with_name(f".{out.name}.{kind}-{_new_id()}")
    d.mkdir()
    try:
        _write_marker(d)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def _remove_marked(p: Path) -> None:
    """Delete a staging of ours, its marker last: an interrupted delete stays recognisable as ours."""
    if p.is_symlink() or not p.is_dir():
        with contextlib.suppress(OSError):
            p.unlink()
        return
    for child in p.iterdir():
        if child.name != _MARKER:
            _remove(child)
    with contextlib.suppress(OSError):
        (p / _MARKER).unlink()
    with contextlib.suppress(OSError):
        p.rmdir()


def _strip_marker(d: Path) -> None:
    with contextlib.suppress(OSError):
        (d / _MARKER).unlink()


def resolve_out(out: str | os.PathLike, what: str = "output directory") -> Path:
    """OUT as the real path it names (a symlink's target: stagings go beside it and the link keeps
    pointing at the new content); refuse the current directory, a directory holding it, a filesystem
    root and a mount point, which cannot be swapped."""
    given = Path(out)
    p = given.resolve()
    cwd = Path.cwd().resolve()
    if p.parent == p or not p.name:
        raise ValueError(f"{what} {str(given)!r} is a filesystem root; write to a subdirectory of it")
    if p == cwd or p in cwd.parents:
        which = "the current directory" if p == cwd else "a directory holding the current directory"
        raise ValueError(f"{what} {str(given)!r} is {which}; name a new or other directory")
    if os.path.ismount(p):
        raise ValueError(f"{what} {str(given)!r} is a mount point; write to a subdirectory of it")
    return p


def recover_stagings(out: Path) -> None:
    """Finish what a crashed merge or convert into ``out`` left (under the lock of OUT's directory)."""
    from ..core.io import _dir_lock

    with _dir_lock(out.parent):
        _recover_locked(out)


def _recover_locked(out: Path) -> None:
    """Put a set-aside old OUT back (a crash between the two renames), drop dead stagings.

    Touched are only siblings whose name is exactly one lohakit generates, that are real
    directories holding a valid lohakit marker, and whose owner process is gone."""
    pattern = _leftover_pattern(out)
    try:
        names = sorted(p.name for p in out.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return
    olds: list[tuple[float, Path]] = []
    stale: list[Path] = []
    for name in names:
        p = out.parent / name
        info = _read_marker(p)
        if info is None or _owner_alive(info):
            continue
        if pattern.fullmatch(name).group(1) == "old":  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                olds.append(((p / _MARKER).stat().st_mtime, p))
        else:
            stale.append(p)
    olds.sort()
    if olds and not os.path.lexists(out):
        newest = olds.pop()[1]
        os.replace(newest, out)
        _strip_marker(out)
    for p in [p for _, p in olds] + stale:
        _remove_marked(p)
    info = _read_marker(out)  # a crash after OUT was marked for a swap (or before its marker was dropped)
    if info is not None and not _owner_alive(info):
        _strip_marker(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically (Linux ``renameat2``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, f"cannot swap {b} with the new directory {a}: {os.strerror(err)}; {b} is unchanged", str(b))


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
    """Make the complete, marked staging directory ``staged`` be ``out``; on any failure ``out``
    stays as it was. Runs under the lock of OUT's directory, as recovery does, so that recovery
    never sees a swap half done by a live process."""
    from ..core.io import _dir_lock

    with _dir_lock(out.parent):
        _swap_locked(staged, out)


def _swap_locked(staged: Path, out: Path) -> None:
    if not os.path.lexists(out):
        os.replace(staged, out)
        _strip_marker(out)
        return
    marked = False  # the old OUT is marked too: after a crash mid-swap recovery knows it as ours
    if out.is_dir() and not out.is_symlink():
        with contextlib.suppress(OSError):
            _write_marker(out)
            marked = True
    try:
        swapped = _exchange(staged, out)
    except BaseException:
        if marked:
            _strip_marker(out)
        raise
    if swapped:
        _strip_marker(out)  # the new OUT
        _remove_marked(staged)  # now the old OUT
        return
    old = out.with_name(f".{out.name}.old-{_new_id()}")
    try:
        os.replace(out, old)
    except BaseException:
        if marked:
            _strip_marker(out)
        raise
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old, out)  # put the old OUT back before reporting the failure
        if marked:
            _strip_marker(out)
        raise
    _strip_marker(out)
    _remove_marked(old)


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

    given, adapter_p = Path(out), Path(adapter)
    out_p = resolve_out(given)  # a symlink's target; not ".", a root or a mount point
    if out_p.parent.is_dir():
        recover_stagings(out_p)  # first: an OUT set aside by a crashed merge counts as existing
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {str(given)!r} already exists; pass --overwrite to replace it")
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
    tmp = _new_staging(out_p, "staged")  # marked as ours before anything else is written
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
        if os.path.lexists(tmp):
            _remove_marked(tmp)
    return {"out": str(given), "merged_modules": n, "files": len(files)}
