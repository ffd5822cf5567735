"""Reading and writing raw tensor files, safely.

* :func:`load_state_dict` reads a ``.safetensors`` file (never unpickles anything) or, for
  legacy ``.bin``/``.pt`` files, goes through ``torch.load(weights_only=True)`` only.
* :func:`save_state_dict` writes safetensors atomically: a temporary file in the destination's
  directory, ``fsync``, then ``os.replace``. If anything fails (disk full, an interrupt, a bad
  tensor) the previous file is untouched and no temporary file is left behind.

Every problem with a file's content raises a subclass of :class:`LoHaFormatError` (itself a
``ValueError``) whose message names the file, the key and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "LoHaFormatError",
    "AdapterNotFoundError",
    "CorruptFileError",
    "UnsafeFileError",
    "AdapterConfigError",
    "AdapterNameError",
    "StateDictMismatchError",
    "NonFiniteTensorError",
    "NonFiniteTensorWarning",
    "load_state_dict",
    "save_state_dict",
    "read_safetensors_metadata",
    "atomic_write_bytes",
    "StagedWrites",
]

#: Extensions read through ``torch.load(weights_only=True)``; never written by lohakit.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"


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


class AdapterConfigError(LoHaFormatError):
    """``adapter_config.json`` is not valid JSON, not a LoHa config, or does not fit the model."""


class AdapterNameError(LoHaFormatError):
    """An adapter name or subfolder that is not a plain name (path separators, ``..``)."""


class StateDictMismatchError(LoHaFormatError):
    """Tensors missing, unexpected, or with a shape/dtype the config does not allow."""


class NonFiniteTensorError(LoHaFormatError):
    """A tensor holds NaN or inf (raised with ``strict=True``; otherwise a warning)."""


class NonFiniteTensorWarning(UserWarning):
    """A loaded tensor holds NaN or inf."""


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CorruptFileError(f"{path}: is a directory, expected a tensor file") from None


def _is_pickle_file(path: Path, data: bytes) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix.lower() == ".safetensors":
        return False
    return data[:4] == _ZIP_MAGIC


def _load_safetensors_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    if len(data) < 8:
        raise CorruptFileError(f"{path}: {len(data)} bytes, too short for a safetensors file (truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise CorruptFileError(
            f"{path}: safetensors header claims {header_len} bytes but the file has {len(data) - 8} after the "
            "length prefix (truncated or not a safetensors file)"
        )
    try:
        out = st_load(data)
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, torch may raise on odd dtypes
        raise CorruptFileError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    return dict(out)


def _load_pickle_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    import io as _io

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


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` file onto the CPU.

    ``.safetensors`` files (or any file not named ``.bin``/``.pt``/``.pth``/``.ckpt`` that is
    not a zip archive) are parsed by safetensors. Pickle-based files are read only through
    ``torch.load(weights_only=True)``, which refuses anything that is not tensors and plain
    containers. The file is read into memory once, so the tensors own their storage and do not
    depend on the file afterwards.

    Args:
        path: The file.

    Returns:
        Tensors by name, on the CPU, in the file's dtypes.

    Raises:
        AdapterNotFoundError: No such file.
        CorruptFileError: Truncated/corrupted file, or not a flat dict of tensors.
        UnsafeFileError: A pickle holding arbitrary objects.
    """
    p = Path(path)
    data = _read_bytes(p)
    if _is_pickle_file(p, data):
        return _load_pickle_bytes(data, p)
    return _load_safetensors_bytes(data, p)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` when absent).

    Raises:
        CorruptFileError: The header cannot be parsed.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(f"{p}: too short for a safetensors file")
            n = int.from_bytes(prefix, "little")
            size = os.fstat(fh.fileno()).st_size
            if n > size - 8:
                raise CorruptFileError(f"{p}: safetensors header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{p}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{p}: safetensors header is not valid JSON ({e})") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptFileError(f"{p}: safetensors __metadata__ must map strings to strings")
    return dict(meta)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StagedWrites:
    """Write several files all-or-nothing (as far as a filesystem allows).

    Each :meth:`stage_*` call writes a temporary file next to its destination and fsyncs it;
    :meth:`commit` renames them all into place. Leaving the ``with`` block with an exception
    (or without committing) deletes every temporary file, so existing files stay untouched.

    Example:
        >>> with StagedWrites() as w:
        ...     w.stage_bytes(b"{}", "out/adapter_config.json")
        ...     w.stage_safetensors(tensors, "out/adapter_model.safetensors")
        ...     w.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def __enter__(self) -> "StagedWrites":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()

    def _temp_for(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        tmp_path = Path(tmp)
        self._staged.append((tmp_path, dest))
        return tmp_path

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
        with open(tmp, "wb") as fh:
            fh.write(data)
        self._finish(tmp, d)

    def stage_safetensors(
        self, state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Stage a safetensors file for ``dest`` (tensors checked first, see :func:`save_state_dict`)."""
        from safetensors.torch import save_file

        d = Path(dest)
        prepared = _prepare_for_safetensors(state_dict, d)
        meta = _check_metadata(metadata, d)
        tmp = self._temp_for(d)
        save_file(prepared, str(tmp), metadata=meta)
        self._finish(tmp, d)

    def commit(self) -> None:
        """Rename every staged file into place (``os.replace``, atomic per file)."""
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

    def discard(self) -> None:
        """Delete every staged temporary file that was not committed."""
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []


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
    file is removed. Pickle formats are never written.

    Args:
        state_dict: ``{name: tensor}``.
        path: Destination (``.safetensors``; a ``.bin``/``.pt`` name is refused).
        metadata: Header metadata, strings only (e.g. ``{"format": "pt"}``).

    Raises:
        ValueError: A pickle-style file name, or a meta tensor.
        TypeError: A non-tensor value or non-string metadata.
        OSError: The write failed (the old file is intact).
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

