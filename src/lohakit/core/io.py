"""Reading and writing raw tensor files, safely.

* :func:`load_state_dict` reads a ``.safetensors`` file (never unpickles anything) or, for
  legacy ``.bin``/``.pt`` files, goes through ``torch.load(weights_only=True)`` only.
* :func:`save_state_dict` writes safetensors atomically: a temporary file in the destination's
  directory, ``fsync``, then ``os.replace``. If anything fails (disk full, an interrupt, a bad
  tensor) the previous file is untouched and no temporary file is left behind.
* :class:`StagedWrites` with a ``root`` writes several files as one transaction (a staging
  directory, a commit record, renames; an interrupted commit is finished by the next writer or
  reader), and :func:`read_files_consistently` reads such a set of files so that it never
  combines files of two different saves.

Resources are bounded before anything is read: only regular files are opened (never a device,
FIFO or socket; a FIFO cannot block the open), a safetensors header is capped at
:data:`MAX_HEADER_BYTES` and checked against the file size before the tensors are read, and a
legacy zip ``.bin``'s uncompressed size is checked before ``torch.load``.

Every problem with a file's content raises a subclass of :class:`LoHaFormatError` (itself a
``ValueError``) whose message names the file, the key and what was expected. Failing writes
raise :class:`OSError` (with its ``errno``) naming the file; the previous file is intact.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import io as _io
import json
import os
import pickle
import re
import secrets
import shutil
import stat as _stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

try:  # POSIX only; elsewhere writers do not lock (documented)
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

__all__ = [
    "LoHaFormatError",
    "AdapterNotFoundError",
    "CorruptFileError",
    "UnsafeFileError",
    "UnreadableFileError",
    "ResourceLimitError",
    "AdapterConfigError",
    "AdapterNameError",
    "AdapterChangedError",
    "StateDictMismatchError",
    "NonFiniteTensorError",
    "NonFiniteTensorWarning",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "load_state_dict",
    "load_safetensors_with_metadata",
    "parse_state_dict_bytes",
    "save_state_dict",
    "read_safetensors_metadata",
    "read_regular_file",
    "load_json_file",
    "parse_json_bytes",
    "tensor_is_finite",
    "atomic_write_bytes",
    "StagedWrites",
    "read_files_consistently",
    "recover_interrupted_saves",
]

#: Extensions read through ``torch.load(weights_only=True)``; never written by lohakit.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"

#: Largest safetensors header accepted (the limit safetensors itself applies).
MAX_HEADER_BYTES = 100_000_000
#: Largest JSON file (``adapter_config.json`` and similar) read.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Deepest nesting of arrays/objects accepted in a JSON file or header.
MAX_JSON_DEPTH = 64
#: A legacy zip ``.bin`` may inflate to at most this many times its size (plus
#: :data:`_ZIP_SLACK_BYTES`); ``torch.save`` stores entries uncompressed, so a real file is ~1x.
MAX_ZIP_RATIO = 4
_ZIP_SLACK_BYTES = 16 * 1024 * 1024
_MAX_ZIP_ENTRIES = 1_000_000


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
class LoHaFormatError(ValueError):
    """Root of lohakit's file-format errors: catch this to handle any bad adapter file."""


class AdapterNotFoundError(LoHaFormatError):
    """The adapter directory, file or Hub repository does not exist or lacks a required file."""


class CorruptFileError(LoHaFormatError):
    """A file is truncated, corrupted, or not in the format its name says."""


class UnsafeFileError(LoHaFormatError):
    """A pickle file holds objects other than tensors (refused: it could run code)."""


class UnreadableFileError(LoHaFormatError):
    """A path that cannot be read as a regular file: permission denied, a symlink loop, a
    directory, or a device, FIFO or socket (refused: reading it could block or never end)."""


class ResourceLimitError(LoHaFormatError):
    """A declared size (header, metadata, JSON, archive content) exceeds lohakit's caps."""


class AdapterConfigError(LoHaFormatError):
    """``adapter_config.json`` is not valid JSON, not a LoHa config, or does not fit the model."""


class AdapterNameError(LoHaFormatError):
    """An adapter name or subfolder that is not a plain name (path separators, ``..``)."""


class AdapterChangedError(LoHaFormatError):
    """The adapter's files changed while they were read (a concurrent save), or an interrupted
    save is still pending and could not be completed: the files were not combined."""


class StateDictMismatchError(LoHaFormatError):
    """Tensors missing, unexpected, or with a shape/dtype the config does not allow."""


class NonFiniteTensorError(LoHaFormatError):
    """A tensor holds NaN or inf (raised with ``strict=True``; otherwise a warning)."""


class NonFiniteTensorWarning(UserWarning):
    """A loaded tensor holds NaN or inf."""


# ------------------------------------------------------------------------------------------
# Opening files: regular files only, sizes known before reading
# ------------------------------------------------------------------------------------------
def _os_error(path: Path, e: OSError, what: str = "file") -> LoHaFormatError:
    """The documented error for an OSError raised while opening or reading ``path``."""
    if isinstance(e, FileNotFoundError):
        return AdapterNotFoundError(f"{path}: {what} not found")
    if isinstance(e, IsADirectoryError):
        return UnreadableFileError(f"{path}: is a directory, expected a {what}")
    if isinstance(e, PermissionError):
        return UnreadableFileError(f"{path}: permission denied (cannot read the {what})")
    if e.errno == _errno.ELOOP:
        return UnreadableFileError(f"{path}: too many levels of symbolic links (a symlink loop?)")
    if e.errno == _errno.ENOTDIR:
        return AdapterNotFoundError(f"{path}: {what} not found (a component of the path is not a directory)")
    reason = e.strerror or type(e).__name__
    return UnreadableFileError(f"{path}: cannot read the {what} ({reason})")


def _kind(mode: int) -> str:
    for test, name in (
        (_stat.S_ISDIR, "a directory"),
        (_stat.S_ISFIFO, "a FIFO (named pipe)"),
        (_stat.S_ISCHR, "a character device"),
        (_stat.S_ISBLK, "a block device"),
        (_stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, what: str = "file") -> tuple[int, os.stat_result]:
    """Open ``path`` read-only if it is a regular file (symlinks followed); return (fd, fstat).

    ``os.stat`` first so that a device or FIFO is refused without opening it; ``O_NONBLOCK``
    so that a FIFO swapped in between stat and open cannot block; ``fstat`` after the open
    checks the file actually opened.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(path, e, what) from None
    if not _stat.S_ISREG(st.st_mode):
        raise UnreadableFileError(f"{path}: is {_kind(st.st_mode)}, expected a regular {what}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(path, e, what) from None
    try:
        fst = os.fstat(fd)
        if not _stat.S_ISREG(fst.st_mode):
            raise UnreadableFileError(f"{path}: is {_kind(fst.st_mode)}, expected a regular {what}")
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def _read_exact(fd: int, n: int, path: Path, what: str = "file") -> bytes:
    """Read exactly ``n`` bytes from ``fd`` (a file shrinking meanwhile is reported)."""
    chunks: list[bytes] = []
    left = n
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 26))
            if not chunk:
                raise CorruptFileError(f"{path}: the {what} ended after {n - left} of {n} bytes (truncated while read?)")
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise _os_error(path, e, what) from None
    return b"".join(chunks)


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file") -> bytes:
    """All bytes of a regular file, refusing anything else and anything over ``max_bytes``.

    Args:
        path: The file (symlinks are followed; the target must be a regular file).
        max_bytes: Largest size accepted (``None``: no cap).
        what: What the file is, for messages ("adapter config", "tensor file").

    Raises:
        AdapterNotFoundError: No such file.
        UnreadableFileError: Permission denied, a symlink loop, a directory, device, FIFO, socket.
        ResourceLimitError: Larger than ``max_bytes``.
    """
    p = Path(path)
    fd, st = _open_regular(p, what)
    try:
        return _read_fd(fd, st, p, max_bytes, what)
    finally:
        os.close(fd)


def _read_fd(fd: int, st: os.stat_result, path: Path, max_bytes: int | None, what: str) -> bytes:
    if max_bytes is not None and st.st_size > max_bytes:
        raise ResourceLimitError(f"{path}: the {what} is {st.st_size} bytes, more than the {max_bytes} lohakit reads")
    return _read_exact(fd, st.st_size, path, what)


# ------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------
def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether no array/object in the JSON text nests deeper than ``limit`` (strings skipped)."""
    depth = 0
    in_string = False
    escape = False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json_bytes(data: bytes, path: str | os.PathLike, what: str = "JSON file", error: type[LoHaFormatError] = CorruptFileError) -> Any:
    """Parse UTF-8 JSON with bounded nesting; every failure is ``error`` naming ``path``.

    Nesting deeper than :data:`MAX_JSON_DEPTH` is refused before parsing (so no
    ``RecursionError``). ``NaN``/``Infinity`` parse (as Python's json does) for the caller's
    finiteness checks to name the field.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: the {what} is not UTF-8 text ({e})") from None
    if not _json_depth_ok(text, MAX_JSON_DEPTH):
        raise error(f"{path}: the {what} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path}: the {what} is not valid JSON ({e})") from None


def load_json_file(path: str | os.PathLike, what: str = "JSON file", error: type[LoHaFormatError] = CorruptFileError) -> Any:
    """Read and parse a JSON file: regular file, at most :data:`MAX_JSON_BYTES`, bounded depth."""
    return parse_json_bytes(read_regular_file(path, MAX_JSON_BYTES, what), path, what, error)


# ------------------------------------------------------------------------------------------
# Reading tensors
# ------------------------------------------------------------------------------------------
def _is_pickle_file(path: Path, data: bytes) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix.lower() == ".safetensors":
        return False
    return data[:4] == _ZIP_MAGIC


_ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8, "U64": 8,
    "U32": 4, "U16": 2,
}


def _check_safetensors_header(header: Any, data_len: int, path: Path) -> None:
    """Structure of a parsed safetensors header: dtypes, shapes and offsets fit the data."""
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: the safetensors header is {type(header).__name__}, expected a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(f"{path}: safetensors __metadata__ must map strings to strings")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CorruptFileError(f"{path}: header entry {key!r} must hold dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPE_BYTES:
            raise CorruptFileError(
                f"{path}: tensor {key!r} has dtype {dtype!r}, which lohakit cannot read "
                f"(known: {', '.join(sorted(_ST_DTYPE_BYTES))})"
            )
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CorruptFileError(f"{path}: tensor {key!r} has shape {shape!r}, expected a list of non-negative integers")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise CorruptFileError(
                f"{path}: tensor {key!r} has data_offsets {offsets!r}, expected [begin, end] within the "
                f"{data_len} data bytes"
            )
        numel = 1
        for s in shape:
            numel *= s
        if numel * _ST_DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise CorruptFileError(
                f"{path}: tensor {key!r} of shape {shape} and dtype {dtype} needs {numel * _ST_DTYPE_BYTES[dtype]} "
                f"bytes, its data_offsets give {offsets[1] - offsets[0]}"
            )


def _parse_header(raw: bytes, data_len: int | None, path: Path) -> dict[str, Any]:
    """The parsed header; its problems are reported as "not a valid safetensors file (...)"."""
    try:
        header = parse_json_bytes(raw, path, "safetensors header")
        if data_len is not None:
            _check_safetensors_header(header, data_len, path)
        elif not isinstance(header, dict):
            raise CorruptFileError(f"{path}: the safetensors header is {type(header).__name__}, expected a JSON object")
    except CorruptFileError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise CorruptFileError(f"{path}: not a valid safetensors file ({detail})") from None
    return header


def _safetensors_header(prefix: bytes, size: int, path: Path) -> int:
    """Header length from the 8-byte prefix, checked against the cap and the file size."""
    if size < 8 or len(prefix) < 8:
        raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise ResourceLimitError(
            f"{path}: the safetensors header claims {n} bytes, more than the {MAX_HEADER_BYTES} lohakit reads "
            "(corrupted or not a safetensors file)"
        )
    if n > size - 8:
        raise CorruptFileError(
            f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the "
            "length prefix (truncated or not a safetensors file)"
        )
    return n


def _load_safetensors_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    n = _safetensors_header(data[:8], len(data), path)
    _parse_header(data[8 : 8 + n], len(data) - 8 - n, path)
    try:
        out = st_load(data)
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, torch may raise on odd dtypes
        raise CorruptFileError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    return dict(out)


def _check_zip_size(data: bytes, path: Path) -> None:
    """Refuse a zip whose entries inflate to much more than the file (a zip bomb)."""
    try:
        with zipfile.ZipFile(_io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise CorruptFileError(f"{path}: not a readable torch zip archive ({type(e).__name__}: {e})") from None
    if len(infos) > _MAX_ZIP_ENTRIES:
        raise ResourceLimitError(f"{path}: the archive lists {len(infos)} entries, more than {_MAX_ZIP_ENTRIES}")
    total = sum(max(i.file_size, 0) for i in infos)
    cap = MAX_ZIP_RATIO * len(data) + _ZIP_SLACK_BYTES
    if total > cap:
        raise ResourceLimitError(
            f"{path}: the archive's entries inflate to {total} bytes from a {len(data)}-byte file, more than the "
            f"{cap} lohakit accepts (torch.save stores tensors uncompressed; a zip bomb?)"
        )


def _load_pickle_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    if data[:4] == _ZIP_MAGIC:
        _check_zip_size(data, path)
    try:
        obj = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower() or "global" in ln.lower()), "")
        raise UnsafeFileError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) refused it{': ' + detail if detail else ''}). "
            "Convert the file to safetensors with a tool you trust."
        ) from None
    except MemoryError:
        raise
    except Exception as e:
        raise CorruptFileError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CorruptFileError(
            f"{path}: expected a flat dict str -> tensor; entry {bad[0]!r} is "
            f"{type(obj[bad[0]]).__name__}" + (f" ({len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    return obj


def parse_state_dict_bytes(data: bytes, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Parse a tensor file's bytes (read elsewhere) as :func:`load_state_dict` does.

    Args:
        data: The file's content.
        path: Its name (decides safetensors vs ``torch.load(weights_only=True)``; for messages).
    """
    p = Path(path)
    if _is_pickle_file(p, data):
        return _load_pickle_bytes(data, p)
    return _load_safetensors_bytes(data, p)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` file onto the CPU.

    ``.safetensors`` files (or any file not named ``.bin``/``.pt``/``.pth``/``.ckpt`` that is
    not a zip archive) are parsed by safetensors. Pickle-based files are read only through
    ``torch.load(weights_only=True)``, which refuses anything that is not tensors and plain
    containers. The file is read into memory once, so the tensors own their storage and do not
    depend on the file afterwards.

    Only regular files are read (a symlink to one is fine): a device (``/dev/zero``), FIFO or
    socket is refused before it is opened. A safetensors header larger than
    :data:`MAX_HEADER_BYTES` or than the file, and a zip ``.bin`` inflating to more than
    :data:`MAX_ZIP_RATIO` times its size, are refused before their content is read.

    Args:
        path: The file.

    Returns:
        Tensors by name, on the CPU, in the file's dtypes.

    Raises:
        AdapterNotFoundError: No such file.
        UnreadableFileError: Permission denied, a symlink loop, not a regular file.
        ResourceLimitError: A declared size over lohakit's caps.
        CorruptFileError: Truncated/corrupted file, or not a flat dict of tensors.
        UnsafeFileError: A pickle holding arbitrary objects.
    """
    p = Path(path)
    fd, st = _open_regular(p, "tensor file")
    try:
        if p.suffix.lower() not in PICKLE_SUFFIXES:
            prefix = _read_exact(fd, min(8, st.st_size), p, "tensor file")
            if prefix[:4] != _ZIP_MAGIC or p.suffix.lower() == ".safetensors":
                _safetensors_header(prefix, st.st_size, p)  # before reading the whole file
            data = prefix + _read_exact(fd, st.st_size - len(prefix), p, "tensor file")
        else:
            data = _read_exact(fd, st.st_size, p, "tensor file")
    finally:
        os.close(fd)
    return parse_state_dict_bytes(data, p)


def load_safetensors_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and its ``__metadata__``, from one read of the file.

    The same checks as :func:`load_state_dict` (regular file, header cap before reading); for
    readers such as kohya's that need both without opening the file twice.

    Raises:
        The errors of :func:`load_state_dict`.
    """
    p = Path(path)
    fd, st = _open_regular(p, "safetensors file")
    try:
        prefix = _read_exact(fd, min(8, st.st_size), p, "safetensors file")
        n = _safetensors_header(prefix, st.st_size, p)
        data = prefix + _read_exact(fd, st.st_size - len(prefix), p, "safetensors file")
    finally:
        os.close(fd)
    tensors = _load_safetensors_bytes(data, p)  # checks the header's structure first
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    return tensors, dict(header.get("__metadata__", {}))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` when absent).

    Reads the header only (capped at :data:`MAX_HEADER_BYTES`).

    Raises:
        AdapterNotFoundError: No such file.
        UnreadableFileError: Not a readable regular file.
        ResourceLimitError: The header claims more than the cap.
        CorruptFileError: The header cannot be parsed.
    """
    p = Path(path)
    fd, st = _open_regular(p, "safetensors file")
    try:
        prefix = _read_exact(fd, min(8, st.st_size), p, "safetensors file")
        n = _safetensors_header(prefix, st.st_size, p)
        header = _parse_header(_read_exact(fd, n, p, "safetensors file"), None, p)
    finally:
        os.close(fd)
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptFileError(f"{p}: safetensors __metadata__ must map strings to strings")
    return dict(meta)


# ------------------------------------------------------------------------------------------
# Tensor checks
# ------------------------------------------------------------------------------------------
_FINITE_CHUNK = 1 << 22


def tensor_is_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, for any dtype.

    Integer and bool tensors are always finite. float8 (and other dtypes ``torch.isfinite``
    does not implement) are checked in float32 chunks of a few million elements.

    Raises:
        TypeError: A dtype that cannot be converted to float32 (e.g. packed float4).
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.numel() == 0:
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (NotImplementedError, RuntimeError):
        pass
    flat = t.detach().reshape(-1)
    try:
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            if not bool(torch.isfinite(flat[start : start + _FINITE_CHUNK].to(torch.float32)).all()):
                return False
    except (NotImplementedError, RuntimeError) as e:
        raise TypeError(f"dtype {t.dtype} cannot be checked for finiteness ({e})") from None
    return True


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_STAGING_PREFIX = ".lohakit-save-"
_STAGING_SUFFIX = ".tmp"
_MANIFEST = "MANIFEST.json"
_STAGED_FILES = "files"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _dir_lock(directory: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on a directory; yields whether the lock is held.

    Writers hold it while they stage and commit; readers take it (non-blocking) only to finish
    an interrupted save. Where locks are unavailable (no ``fcntl``, a filesystem refusing
    them) the body runs unlocked and the context yields False. With ``blocking=False`` a lock
    held elsewhere raises :class:`BlockingIOError`.
    """
    if _fcntl is None:
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield False
        return
    try:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | (0 if blocking else _fcntl.LOCK_NB))
            locked = True
        except BlockingIOError:
            raise
        except OSError:  # e.g. ENOLCK on some network filesystems
            locked = False
        yield locked
    finally:
        try:  # unlock first: should the close fail or be interrupted, the lock is gone anyway
            _fcntl.flock(fd, _fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)


def _raise_write_error(e: BaseException, path: Path) -> None:
    """Re-raise a failed write of ``path`` as an OSError naming it (errno kept when known)."""
    if isinstance(e, OSError):
        raise OSError(
            e.errno, f"{path}: could not write the file ({e.strerror or e}); the previous file is intact", str(path)
        ) from e
    m = re.search(r"(?:code:\s*|os error\s+)(\d+)", str(e))
    code = int(m.group(1)) if m else _errno.EIO
    reason = os.strerror(code) if m else str(e)
    raise OSError(code, f"{path}: could not write the file ({reason}); the previous file is intact", str(path)) from None


def _write_safetensors(prepared: Mapping[str, torch.Tensor], tmp: Path, meta: Mapping[str, str] | None, dest: Path) -> None:
    import safetensors.torch as st

    try:
        st.save_file(prepared, str(tmp), metadata=meta)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError wraps the OS error (EFBIG, ENOSPC) in its message
        _raise_write_error(e, dest)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _roll_forward(staging: Path, manifest: Mapping[str, Any]) -> None:
    """Move every staged file of a committed save still in ``staging`` into place, then drop it."""
    root = staging.parent
    dirs = {root}
    for name, rel in manifest["entries"]:
        src = staging / _STAGED_FILES / name
        dest = root / rel
        if src.exists():
            os.replace(src, dest)
        dirs.add(dest.parent)
    for d in dirs:
        _fsync_dir(d)
    (staging / _MANIFEST).unlink(missing_ok=True)
    _remove_tree(staging)
    _fsync_dir(root)


def _read_manifest(staging: Path) -> dict[str, Any] | None:
    """The commit record of a staging directory (None: not committed; junk is treated as None)."""
    try:
        raw = (staging / _MANIFEST).read_bytes()
    except OSError:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
        entries = manifest["entries"]
        if not all(
            isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
            and isinstance(r, str) and not os.path.isabs(r) and ".." not in Path(r).parts
            for n, r in entries
        ):
            return None
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return manifest


def _staging_dirs(root: Path) -> list[Path]:
    try:
        return sorted(
            p for p in root.iterdir() if p.name.startswith(_STAGING_PREFIX) and p.name.endswith(_STAGING_SUFFIX) and p.is_dir()
        )
    except OSError:
        return []


def recover_interrupted_saves(root: str | os.PathLike, blocking: bool = True) -> int:
    """Finish or discard the staged saves a crashed writer left in ``root``.

    A committed save (its commit record written) is completed: the remaining files are moved
    into place. An uncommitted one never touched the targets and is deleted, as are stale
    temporary files of single-file writes. Runs under the directory's writer lock.

    Args:
        root: The directory a save staged into (a save's common parent directory).
        blocking: Wait for a writer holding the lock (else raise :class:`BlockingIOError`).

    Returns:
        How many staged saves were found and resolved.
    """
    r = Path(root)
    with _dir_lock(r, blocking=blocking) as locked:
        if not locked:
            return 0
        return _recover_locked(r)


def _recover_locked(root: Path) -> int:
    count = 0
    for staging in _staging_dirs(root):
        manifest = _read_manifest(staging)
        if manifest is not None:
            _roll_forward(staging, manifest)
        else:
            _remove_tree(staging)
        count += 1
    return count


def _pending_saves(directories: Sequence[Path]) -> list[Path]:
    """Committed, unfinished saves that may still move files into ``directories``."""
    found: list[Path] = []
    roots = {d for d in directories} | {d.parent for d in directories}
    for root in sorted(roots):
        for staging in _staging_dirs(root):
            manifest = _read_manifest(staging)
            if manifest is None:
                continue
            dests = {(root / rel).parent for _, rel in manifest["entries"]}
            if any(os.path.abspath(d) in {os.path.abspath(x) for x in directories} for d in dests):
                found.append(staging)
    return found


class StagedWrites:
    """Write several files all-or-nothing.

    Each :meth:`stage_*` call writes a temporary file and fsyncs it; :meth:`commit` renames
    them all into place. Leaving the ``with`` block with an exception (or without committing)
    deletes every temporary file, so existing files stay untouched.

    Without ``root`` each temporary file sits next to its destination (one file: atomic).
    With ``root`` (a directory above every destination, on the same filesystem) the save is
    one transaction: every file is staged in ``root/.lohakit-save-<id>.tmp/``; :meth:`commit`
    writes a commit record there (the commit point), renames the files into place, and removes
    the staging directory. A crash before the commit point leaves the targets untouched; after
    it, the next save into ``root`` or the next load by :func:`read_files_consistently`
    completes the renames. The writer holds an exclusive ``flock`` on ``root`` (POSIX) from
    the first staged file to the end, so concurrent saves run one after the other, each whole,
    and stale staging directories of crashed saves are resolved first.

    Example:
        >>> with StagedWrites(root="out") as w:
        ...     w.stage_bytes(b"{}", "out/adapter_config.json")
        ...     w.stage_safetensors(tensors, "out/adapter_model.safetensors")
        ...     w.commit()
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._root = Path(root) if root is not None else None
        self._staging: Path | None = None
        self._locks = contextlib.ExitStack()
        self._locked_dirs: set[str] = set()

    def __enter__(self) -> "StagedWrites":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.discard()
        finally:
            self._locks.close()

    # -------------------------------------------------------------- staging
    def _lock(self, directory: Path) -> None:
        key = os.path.abspath(directory)
        if key in self._locked_dirs:
            return
        self._locked_dirs.add(key)
        self._locks.enter_context(_dir_lock(directory))

    def _begin(self) -> Path:
        assert self._root is not None
        if self._staging is None:
            self._root.mkdir(parents=True, exist_ok=True)
            self._lock(self._root)
            _recover_locked(self._root)  # a crashed save's leftovers, under our lock
            staging = self._root / f"{_STAGING_PREFIX}{secrets.token_hex(8)}{_STAGING_SUFFIX}"
            (staging / _STAGED_FILES).mkdir(parents=True)
            self._staging = staging
        return self._staging

    def _temp_for(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self._root is not None:
            staging = self._begin()
            if os.path.commonpath([os.path.abspath(self._root), os.path.abspath(dest)]) != os.path.abspath(self._root):
                raise ValueError(f"{dest}: outside the transaction's directory {self._root}")
            tmp_path = staging / _STAGED_FILES / str(len(self._staged))
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        else:
            self._lock(dest.parent)
            self._clean_stale_temps(dest)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            os.close(fd)
            tmp_path = Path(tmp)
        self._staged.append((tmp_path, dest))
        return tmp_path

    @staticmethod
    def _clean_stale_temps(dest: Path) -> None:
        """Temporary files of crashed single-file writes of ``dest`` (we hold the directory lock)."""
        if _fcntl is None:
            return
        pattern = re.compile(rf"^\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{6,}}\.tmp$")
        with contextlib.suppress(OSError):
            for p in dest.parent.iterdir():
                if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)

    @staticmethod
    def _finish(tmp: Path, dest: Path) -> None:
        mode = (dest.stat().st_mode & 0o777) if dest.exists() else (0o666 & ~_UMASK)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())

    def stage_bytes(self, data: bytes, dest: str | os.PathLike) -> None:
        """Stage ``data`` for ``dest``."""
        d = Path(dest)
        tmp = self._temp_for(d)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
        except OSError as e:
            _raise_write_error(e, d)
        self._finish(tmp, d)

    def stage_safetensors(
        self, state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Stage a safetensors file for ``dest`` (tensors checked first, see :func:`save_state_dict`)."""
        d = Path(dest)
        prepared = _prepare_for_safetensors(state_dict, d)
        meta = _check_metadata(metadata, d)
        tmp = self._temp_for(d)
        _write_safetensors(prepared, tmp, meta, d)
        self._finish(tmp, d)

    # -------------------------------------------------------------- committing
    def commit(self) -> None:
        """Put every staged file in place (see the class docstring for the guarantees)."""
        if self._root is not None and self._staging is not None:
            self._commit_transaction()
            return
        staged, self._staged = self._staged, []
        try:
            dirs = set()
            while staged:
                tmp, dest = staged[0]
                os.replace(tmp, dest)
                staged.pop(0)
                dirs.add(dest.parent)
            for d in dirs:
                _fsync_dir(d)
        finally:
            self._staged = staged

    def _commit_transaction(self) -> None:
        assert self._root is not None and self._staging is not None
        staging, root = self._staging, self._root
        for _, dest in self._staged:
            if dest.is_dir() and not dest.is_symlink():
                raise IsADirectoryError(_errno.EISDIR, f"{dest}: is a directory; nothing was written", str(dest))
            if os.stat(dest.parent).st_dev != os.stat(staging).st_dev:
                raise OSError(_errno.EXDEV, f"{dest}: on another filesystem than {root}; nothing was written", str(dest))
        entries = [[tmp.name, os.path.relpath(dest, root)] for tmp, dest in self._staged]
        _fsync_dir(staging / _STAGED_FILES)
        part = staging / (_MANIFEST + ".part")
        with open(part, "wb") as fh:
            fh.write(json.dumps({"version": 1, "entries": entries}).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, staging / _MANIFEST)  # the commit point
        _fsync_dir(staging)
        self._staged = []
        manifest = {"entries": entries}
        try:
            _roll_forward(staging, manifest)
        except BaseException as first:
            # Past the commit point the save completes: try once more, else leave the record
            # for the next save or load to finish (never roll back half the files).
            try:
                _roll_forward(staging, manifest)
            except BaseException:
                self._staging = None  # keep the staging directory: it completes the save later
                if isinstance(first, OSError):
                    raise OSError(
                        first.errno,
                        f"{root}: the save was committed but moving its files into place failed ({first.strerror or first}); "
                        f"the complete new files wait in {staging} and the next save or load of this directory "
                        "puts them in place",
                        str(root),
                    ) from first
                raise
            if not isinstance(first, Exception):
                raise  # an interrupt: the save is complete, the interrupt still propagates
        self._staging = None

    def discard(self) -> None:
        """Delete every staged temporary file that was not committed."""
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []
        if self._staging is not None:
            _remove_tree(self._staging)
            self._staging = None


def _check_metadata(metadata: Mapping[str, str] | None, path: Path) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"{path}: safetensors metadata must map str to str, got {metadata!r}")
    return dict(metadata)


def _prepare_for_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage (safetensors forbids aliasing)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{path}: state_dict must be a mapping str -> tensor, got {type(state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: state-dict key {key!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: value for key {key!r} is {type(t).__name__}, expected a torch.Tensor")
        if t.is_meta:
            raise ValueError(
                f"{path}: tensor {key!r} is on the meta device (created with low_cpu_mem_usage and never "
                "loaded); nothing was written"
            )
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if t.numel() and (ident in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
            ident = (t.untyped_storage().data_ptr(), 0)
        seen.add(ident)
        out[key] = t
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically.

    The tensors are checked and prepared first (detached, moved to the CPU, made contiguous,
    aliases cloned), then written to a temporary file in ``path``'s directory, fsynced and
    renamed over ``path``. On any failure ``path`` keeps its old content and the temporary
    file is removed; temporary files of an earlier crashed write of ``path`` are removed by
    the next one. Pickle formats are never written.

    Args:
        state_dict: ``{name: tensor}``.
        path: Destination (``.safetensors``; a ``.bin``/``.pt`` name is refused).
        metadata: Header metadata, strings only (e.g. ``{"format": "pt"}``).

    Raises:
        ValueError: A pickle-style file name, or a meta tensor.
        TypeError: A non-tensor value or non-string metadata.
        OSError: The write failed (``errno`` e.g. ENOSPC, EFBIG; the old file is intact).
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{p}: lohakit writes safetensors only; use a .safetensors file name")
    with StagedWrites() as w:
        w.stage_safetensors(state_dict, p, metadata)
        w.commit()


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with StagedWrites() as w:
        w.stage_bytes(data, path)
        w.commit()


# ------------------------------------------------------------------------------------------
# Reading a set of files that a transaction writes
# ------------------------------------------------------------------------------------------
#: How often a reader retries when a concurrent save changed the files, and its first wait.
READ_ATTEMPTS = 40
_READ_BACKOFF_S = 0.005


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _settle(directories: Sequence[Path]) -> bool:
    """Finish interrupted saves touching ``directories``; False while a writer is committing."""
    for staging in _pending_saves(directories):
        try:
            recover_interrupted_saves(staging.parent, blocking=False)
        except BlockingIOError:
            return False  # a writer holds the lock: it is committing right now
        except OSError as e:
            raise AdapterChangedError(
                f"{staging.parent}: an interrupted save is pending in {staging.name} and could not be completed "
                f"({e.strerror or e}); the next save into {staging.parent}, or a load with write access, completes it"
            ) from None
        if staging.exists() and _read_manifest(staging) is not None:
            raise AdapterChangedError(
                f"{staging.parent}: an interrupted save is pending in {staging.name} and could not be completed "
                "here (no lock available); the next save into this directory completes it"
            )
    return True


def read_files_consistently(
    paths: Sequence[str | os.PathLike],
    max_bytes: Sequence[int | None] | None = None,
    what: Sequence[str] | None = None,
    attempts: int | None = None,
    prechecks: Sequence[Callable[[int, os.stat_result], None] | None] | None = None,
) -> list[bytes]:
    """Read files that one save writes together, never combining two saves.

    All files are opened (regular files only) before any is read, and after reading, the
    paths must still name the files that were read and no committed save may be pending for
    their directories; otherwise the read is retried (a writer is committing) a bounded number
    of times. An interrupted save found on the way is completed first (that needs write access).

    Args:
        paths: The files.
        max_bytes: Per-file size caps (``None`` entries: no cap).
        what: Per-file descriptions for messages.
        attempts: Retries before giving up (default :data:`READ_ATTEMPTS`).
        prechecks: Per-file ``check(fd, fstat)`` run once all files are open and before any is
            read (e.g. a header length against its cap); raise to refuse the file.

    Returns:
        The files' contents, in order.

    Raises:
        AdapterChangedError: The files kept changing while read, or a pending interrupted save
            could not be completed.
        AdapterNotFoundError, UnreadableFileError, ResourceLimitError: As for a single file.
    """
    ps = [Path(p) for p in paths]
    caps = list(max_bytes) if max_bytes is not None else [None] * len(ps)
    names = list(what) if what is not None else ["file"] * len(ps)
    checks = list(prechecks) if prechecks is not None else [None] * len(ps)
    dirs = sorted({p.parent for p in ps})
    n = READ_ATTEMPTS if attempts is None else attempts
    wait = _READ_BACKOFF_S
    for attempt in range(max(n, 1)):
        if attempt:
            time.sleep(wait)
            wait = min(wait * 2, 0.1)
        if not _settle(dirs):
            continue
        fds: list[tuple[int, os.stat_result]] = []
        try:
            try:
                for p, w in zip(ps, names):
                    fds.append(_open_regular(p, w))
            except AdapterNotFoundError:
                if _pending_saves(dirs):
                    continue
                raise
            for (fd, st), check in zip(fds, checks):
                if check is not None:
                    check(fd, st)
            datas = [_read_fd(fd, st, p, cap, w) for (fd, st), p, cap, w in zip(fds, ps, caps, names)]
            if not _pending_saves(dirs) and all(_same_file(p, st) for p, (_, st) in zip(ps, fds)):
                return datas
        finally:
            for fd, _ in fds:
                os.close(fd)
    listed = ", ".join(str(p) for p in ps)
    raise AdapterChangedError(
        f"{listed}: the adapter changed while it was read ({n} attempts; another process is saving into "
        f"{', '.join(str(d) for d in dirs)}); nothing was combined — load again once the save is done"
    )
