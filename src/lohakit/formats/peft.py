"""PEFT's adapter directory format for LoHa, read and written exactly as PEFT does.

Layout of one adapter (a non-default adapter lives in a subfolder named after it)::

    <dir>/adapter_config.json          LoHaConfig fields + peft_type "LOHA", peft_version, auto_mapping
    <dir>/adapter_model.safetensors    metadata {"format": "pt"}; float32 unless save_dtype says otherwise
        base_model.model.<module path>.hada_w1_a    flat: (out, r)             Tucker: (r, out)
        base_model.model.<module path>.hada_w1_b    flat: (r, in/g · prod(k))  Tucker: (r, in/g)
        base_model.model.<module path>.hada_w2_a / hada_w2_b                   (as branch 1)
        base_model.model.<module path>.hada_t1 / hada_t2   Tucker cores (r, r, *k); Conv1d (r, r, k, 1)
        base_model.model.<modules_to_save path>.<state-dict key>   full copies, e.g. classifier.weight

The adapter name never appears in the keys; alpha lives in the config only (per module through
``alpha_pattern``), so a module's scale is ``alpha / r`` with both resolved by the patterns.

Loading reads the config and every tensor, computes from the config and the model which tensors
must exist with which shapes, and checks the file against that plan (missing and unexpected keys,
shapes, dtypes, non-finite values) before the model is touched. Only then are the layers created
(on the meta device with ``low_cpu_mem_usage``) and filled. Should anything still fail, every
change is rolled back: the model's module tree, parameters, requires_grad flags and train/eval
modes are exactly as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

import torch
import torch.nn as nn

from ..core import functional as Fn
from ..core.config import LoHaConfig
from ..core.io import (
    MAX_JSON_BYTES,
    AdapterConfigError,
    AdapterNameError,
    AdapterNotFoundError,
    LoHaFormatError,
    NonFiniteTensorError,
    NonFiniteTensorWarning,
    StagedWrites,
    StateDictMismatchError,
    parse_json_bytes,
    parse_state_dict_bytes,
    read_files_consistently,
    read_regular_file,
    tensor_is_finite,
)
from ..core.io import _safetensors_header as _check_safetensors_prefix
from ..core.layers import LoHaLayer, geometry_of
from ..core.model import LoHaModel, ModulesToSaveWrapper, _check_adapter_name, register_adapter_store
from ..core.patterns import PATTERN_TIME_LIMIT_S, check_patterns as _check_patterns, pattern_forms as _pattern_forms  # noqa: F401
from ..core.targets import pattern_key

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "KEY_PREFIX",
    "PEFT_FORMAT_VERSION",
    "TensorSlot",
    "AdapterSource",
    "resolve_adapter",
    "read_adapter_config",
    "read_adapter",
    "plan_adapter",
    "check_adapter_tensors",
    "peft_state_dict",
    "peft_config_dict",
    "write_adapter_dirs",
    "save_pretrained",
    "from_pretrained",
    "load_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
#: Every key in PEFT's file starts with this (PeftModel.base_model.model).
KEY_PREFIX = "base_model.model."
#: The PEFT release whose layout lohakit writes and is tested against (written as peft_version).
PEFT_FORMAT_VERSION = "0.21.2"

_SAVE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: Floating dtypes a file's factors may have (converted to the adapter's dtype when loaded).
_READABLE_FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(
    d
    for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64,
        *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)),
    )
)
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
_MAX_LISTED = 5


# ------------------------------------------------------------------------------------------
# Locating the files
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's two files are.

    Attributes:
        config_path: ``adapter_config.json``.
        weights_path: ``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``).
        origin: Human-readable origin for messages (directory or Hub repo).
    """

    config_path: Path
    weights_path: Path
    origin: str


def _check_name(name: str, what: str = "adapter name") -> None:
    try:
        _check_adapter_name(name)
    except ValueError as e:
        raise AdapterNameError(str(e) if what == "adapter name" else f"{what}: {e}") from None


def _check_subfolder(subfolder: str | None) -> None:
    if subfolder is None or subfolder == "":
        return
    parts = re.split(r"[\\/]", str(subfolder))
    if os.path.isabs(subfolder) or any(p in ("", ".", "..") for p in parts):
        raise AdapterNameError(
            f"subfolder {subfolder!r} must be a relative path of plain names (no '..', no absolute path)"
        )


def _looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID_RE.match(path)) and ".." not in path and not path.endswith(".")


def _hub_missing(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return False
    return isinstance(exc, EntryNotFoundError)


def resolve_adapter(
    path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> AdapterSource:
    """Find ``adapter_config.json`` and the weights in a local directory or a Hub repository.

    A local directory wins. Otherwise, when ``path`` looks like ``owner/name`` and
    ``huggingface_hub`` is installed, the files are fetched with ``hf_hub_download`` (which
    honours ``HF_HUB_OFFLINE`` and its cache). ``adapter_model.safetensors`` is preferred; the
    legacy ``adapter_model.bin`` is used only when no safetensors file exists.

    Args:
        path: Directory or Hub repo id.
        subfolder: Folder inside it (e.g. a non-default adapter's name).
        revision: Hub revision (branch, tag or commit).
        **hub_kwargs: Passed to ``hf_hub_download`` (``token``, ``cache_dir``, ``local_files_only``).

    Raises:
        AdapterNameError: ``subfolder`` escapes the directory.
        AdapterNotFoundError: Nothing found (the message says where it looked).
    """
    _check_subfolder(subfolder)
    local = Path(path) / subfolder if subfolder else Path(path)
    if local.is_dir():
        cfg = local / ADAPTER_CONFIG_NAME
        if not os.path.lexists(cfg):
            nested = sorted(p.parent.name for p in local.glob(f"*/{ADAPTER_CONFIG_NAME}"))
            hint = f"; adapters found in subfolders {nested} (pass subfolder=...)" if nested else ""
            raise AdapterNotFoundError(f"{local}: no {ADAPTER_CONFIG_NAME} in this directory{hint}")
        for name in (SAFETENSORS_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            # anything present under the name is used, so that a FIFO, device or broken link is
            # refused by the reader with a message naming it instead of being skipped silently
            if os.path.lexists(local / name):
                return AdapterSource(cfg, local / name, f"directory {local}")
        raise AdapterNotFoundError(f"{local}: neither {SAFETENSORS_WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} in this directory")
    if Path(path).exists():
        raise AdapterNotFoundError(f"{local}: expected a directory holding {ADAPTER_CONFIG_NAME}, found a file or nothing")
    path_s = os.fspath(path)
    if not _looks_like_repo_id(path_s):
        raise AdapterNotFoundError(f"{path_s}: no such directory (and not a Hugging Face Hub repo id)")
    try:
        import huggingface_hub
    except ImportError:
        raise AdapterNotFoundError(
            f"{path_s}: no such directory; to download it from the Hugging Face Hub install huggingface_hub "
            "(pip install 'lohakit[hf]')"
        ) from None
    origin = f"Hub repo {path_s}" + (f" (subfolder {subfolder})" if subfolder else "") + (f" @ {revision}" if revision else "")

    def fetch(filename: str) -> Path:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id=path_s, filename=filename, subfolder=subfolder or None, revision=revision, **hub_kwargs
            )
        )

    try:
        cfg = fetch(ADAPTER_CONFIG_NAME)
    except Exception as e:
        raise AdapterNotFoundError(f"{origin}: could not get {ADAPTER_CONFIG_NAME} ({type(e).__name__}: {e})") from e
    try:
        weights = fetch(SAFETENSORS_WEIGHTS_NAME)
    except Exception as e:
        if not _hub_missing(e):
            raise AdapterNotFoundError(f"{origin}: could not get {SAFETENSORS_WEIGHTS_NAME} ({type(e).__name__}: {e})") from e
        try:
            weights = fetch(LEGACY_WEIGHTS_NAME)
        except Exception as e2:
            raise AdapterNotFoundError(
                f"{origin}: neither {SAFETENSORS_WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} could be fetched "
                f"({type(e2).__name__}: {e2})"
            ) from e2
    return AdapterSource(cfg, weights, origin)


# ------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------
def check_patterns(config: LoHaConfig, where: str, names: Iterable[str] | None = None) -> None:
    """:func:`lohakit.core.patterns.check_patterns` raising :class:`AdapterConfigError` (a file's config)."""
    _check_patterns(config, where, names, error=AdapterConfigError)


def _parse_adapter_config(raw: bytes, p: Path, strict: bool) -> LoHaConfig:
    data = parse_json_bytes(raw, p, "adapter config", AdapterConfigError)
    if not isinstance(data, dict):
        raise AdapterConfigError(f"{p}: expected a JSON object with the LoHa config fields, got {type(data).__name__}")
    try:
        config = LoHaConfig.from_dict(data, strict=strict, source=str(p))
    except LoHaFormatError as e:
        raise AdapterConfigError(str(e) if str(p) in str(e) else f"{p}: {e}") from None
    except ValueError as e:  # LoHaConfig's own checks (fields, pattern keys) name what is wrong
        raise AdapterConfigError(str(e) if str(p) in str(e) else f"{p}: {e}") from None
    except (TypeError, KeyError, AttributeError, OverflowError, RecursionError, re.error) as e:
        raise AdapterConfigError(str(e) if str(p) in str(e) else f"{p}: {type(e).__name__}: {e}") from None
    try:
        alphas = {"alpha": config.alpha, **{f"alpha_pattern[{k!r}]": v for k, v in config.alpha_pattern.items()}}
        for name, value in alphas.items():
            if not math.isfinite(value):
                raise AdapterConfigError(f"{p}: {name} must be a finite number, got {value!r}")
    except (TypeError, OverflowError) as e:
        raise AdapterConfigError(f"{p}: alpha values must be finite numbers ({e})") from None
    # the patterns were checked (compiled in the target rules' form, timed) by LoHaConfig itself
    return config


def read_adapter_config(path: str | os.PathLike, strict: bool = False) -> LoHaConfig:
    """Parse and check an ``adapter_config.json`` (PEFT's or lohakit's).

    Beyond :meth:`LoHaConfig.from_dict`: the file must be a regular file of at most
    :data:`~lohakit.core.io.MAX_JSON_BYTES` with bounded nesting; alpha values must be finite;
    every regex (``target_modules`` / ``exclude_modules`` as a string, rank/alpha pattern keys,
    ``layers_pattern``) must compile in the form the target rules use and match in bounded time
    (see :func:`check_patterns`).

    Raises:
        AdapterNotFoundError: No such file.
        UnreadableFileError: Not a readable regular file (permission, FIFO, device, symlink loop).
        ResourceLimitError: Larger than the cap.
        AdapterConfigError: Not UTF-8 JSON, too deep, peft_type not LOHA, unknown keys, bad values,
            a bad or pathological pattern.
    """
    p = Path(path)
    raw = read_regular_file(p, MAX_JSON_BYTES, "adapter config")
    return _parse_adapter_config(raw, p, strict)


# ------------------------------------------------------------------------------------------
# The plan: which tensors the file must hold
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSlot:
    """One tensor an adapter file must provide.

    Attributes:
        key: File key without the ``base_model.model.`` prefix, e.g. ``layers.0.q_proj.hada_w1_a``.
        module_path: Path of the LoHa layer or modules_to_save module in the wrapped model.
        name: Factor name (``hada_w1_a`` …) or the module's own state-dict key (``weight`` …).
        kind: ``"factor"`` or ``"module"`` (a modules_to_save copy).
        shape: Expected shape.
        floating: Whether the tensor must be floating point.
        reason: Where the expectation comes from, for error messages.
        alt_shapes: Other accepted shapes (same numel), e.g. LyCORIS' 3-D Conv1d cores.
    """

    key: str
    module_path: str
    name: str
    kind: str
    shape: tuple[int, ...]
    floating: bool
    reason: str
    alt_shapes: tuple[tuple[int, ...], ...] = ()


def _planner_for(model: nn.Module) -> LoHaModel:
    """A LoHaModel to ask for targets without modifying ``model``.

    For a plain model: a LoHaModel shell whose ``model`` attribute points at it, built without
    running ``__init__`` (which would inject layers). Target discovery only reads the model.
    """
    if isinstance(model, LoHaModel):
        return model
    shell = LoHaModel.__new__(LoHaModel)
    nn.Module.__init__(shell)
    shell.model = model  # registers model as the shell's child; model itself is unchanged
    shell.peft_config = {}
    shell.active_adapter = "default"
    shell.targeted_module_names = []
    return shell


def _inside_wrapper(key: str, wrapper_paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in wrapper_paths)


def plan_adapter(model: nn.Module, config: LoHaConfig, source: str = "<config>") -> tuple[LoHaConfig, dict[str, TensorSlot]]:
    """The tensors ``config`` needs on ``model`` (a plain model or a LoHaModel), keyed by file key.

    Reads the model only. Mirrors what :class:`LoHaModel` will create: the same targets, the
    same rank/alpha pattern resolution, the same factor shapes, the same modules_to_save matches.

    Returns:
        The resolved config (``target_modules`` filled in from the model type when ``None``) and
        the slots.

    Raises:
        AdapterConfigError: The config does not fit the model (no target matches, unsupported
            module type, a modules_to_save entry that matches nothing), naming ``source``.
    """
    planner = _planner_for(model)
    try:
        resolved = planner._resolve_config(config)
    except (ValueError, TypeError, re.error, RecursionError) as e:
        raise AdapterConfigError(f"{source}: the config does not fit the model: {e}") from None
    # the target rules will match every pattern against every module path: time that first
    check_patterns(resolved, source, [n for n, _ in planner.model.named_modules()])
    try:
        targets = planner._find_targets(resolved)
    except LoHaFormatError:
        raise
    except (ValueError, TypeError, re.error, RecursionError) as e:
        raise AdapterConfigError(f"{source}: the config does not fit the model: {e}") from None
    slots: dict[str, TensorSlot] = {}
    for path, module in targets:
        geom = module.geometry if isinstance(module, LoHaLayer) else geometry_of(module)
        if geom is None:  # _find_targets already refuses unsupported types
            raise AdapterConfigError(f"{source}: module {path!r} of type {type(module).__name__} cannot hold LoHa")
        rk = pattern_key(resolved.rank_pattern, path)
        r = resolved.rank_pattern[rk] if rk is not None else resolved.r
        # same rule as LoHaLayer.update_layer: Tucker only for convs with a kernel larger than 1
        tucker = bool(resolved.use_effective_conv2d) and geom.ndim > 0 and geom.kernel_numel > 1
        shapes = Fn.factor_shapes(geom, r, tucker)
        reason = f"module {path!r} ({type(module).__name__}, r={r}" + (f" from rank_pattern {rk!r}" if rk else "")
        reason += ", Tucker form)" if tucker else ")"
        for name, shape in shapes.items():
            alt = ()
            if name in ("hada_t1", "hada_t2") and geom.ndim == 1:
                alt = ((r, r, geom.kernel_size[0]),)  # LyCORIS' 3-D Conv1d core
            key = f"{path}.{name}"
            slots[key] = TensorSlot(key, path, name, "factor", tuple(shape), True, reason, alt)
    wrappers = [p for p, m in planner.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for entry in resolved.modules_to_save or []:
        found = False
        for path, module in planner.model.named_modules():
            if not (path == entry or path.endswith("." + entry)) or _inside_wrapper(path, wrappers):
                continue
            found = True
            source_module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            for k, t in source_module.state_dict().items():
                key = f"{path}.{k}"
                slots[key] = TensorSlot(
                    key, path, k, "module", tuple(t.shape), t.is_floating_point(),
                    f"modules_to_save {entry!r}: a full copy of {path!r} ({type(source_module).__name__})",
                )
        if not found:
            raise AdapterConfigError(f"{source}: modules_to_save entry {entry!r} matches no module of the model")
    return resolved, slots


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(KEY_PREFIX + k) for k in keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def check_adapter_tensors(
    slots: Mapping[str, TensorSlot],
    state_dict: Mapping[str, torch.Tensor],
    weights_path: str | os.PathLike,
    config_path: str | os.PathLike = "<config>",
    strict: bool = False,
) -> dict[str, torch.Tensor]:
    """Check a file's tensors against the plan; return them keyed like the slots.

    Keys may carry PEFT's ``base_model.model.`` prefix (all of them) or none (all of them).

    Raises:
        StateDictMismatchError: Mixed prefixes, missing or unexpected keys, a wrong shape or dtype.
        NonFiniteTensorError: NaN/inf values and ``strict`` (otherwise a NonFiniteTensorWarning).
    """
    wp = str(weights_path)
    keys = list(state_dict)
    prefixed = [k for k in keys if k.startswith(KEY_PREFIX)]
    if prefixed and len(prefixed) != len(keys):
        odd = [k for k in keys if not k.startswith(KEY_PREFIX)]
        raise StateDictMismatchError(
            f"{wp}: some keys start with {KEY_PREFIX!r} and some do not (e.g. {odd[0]!r}); expected all keys in "
            f"PEFT's form '{KEY_PREFIX}<module path>.hada_w1_a'"
        )
    tensors = {k[len(KEY_PREFIX):] if prefixed else k: v for k, v in state_dict.items()}
    missing = [k for k in slots if k not in tensors]
    unexpected = [k for k in tensors if k not in slots]
    if missing or unexpected:
        parts = []
        if missing:
            first = slots[sorted(missing)[0]]
            parts.append(
                f"{len(missing)} tensor(s) the config in {config_path} requires are missing: {_listing(missing)} "
                f"(e.g. {KEY_PREFIX + first.key!r} for {first.reason}, shape {first.shape})"
            )
        if unexpected:
            hint = ""
            if any(re.search(r"\.hada_\w+\.[^.]+$", k) for k in unexpected):
                hint = " (keys ending in an adapter name look like a raw model state_dict, not PEFT's adapter file)"
            modules = sorted({slot.module_path for slot in slots.values()})
            parts.append(
                f"{len(unexpected)} unexpected tensor(s) the config does not produce: {_listing(unexpected)}{hint}; "
                f"the config in {config_path} covers modules {modules[:_MAX_LISTED]}"
                + (f" and {len(modules) - _MAX_LISTED} more" if len(modules) > _MAX_LISTED else "")
            )
        raise StateDictMismatchError(f"{wp}: " + "; ".join(parts))
    nonfinite: list[str] = []
    for key, slot in slots.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            raise StateDictMismatchError(f"{wp}: {KEY_PREFIX + key!r} is {type(t).__name__}, expected a tensor")
        shape = tuple(t.shape)
        if shape != slot.shape and shape not in slot.alt_shapes:
            raise StateDictMismatchError(
                f"{wp}: {KEY_PREFIX + key!r} has shape {shape}, expected {slot.shape} for {slot.reason} "
                f"according to {config_path}"
            )
        if t.is_complex() or (slot.floating and not t.is_floating_point()):
            raise StateDictMismatchError(
                f"{wp}: {KEY_PREFIX + key!r} has dtype {t.dtype}, expected a real floating-point tensor for {slot.reason}"
            )
        if not slot.floating and t.is_floating_point():
            raise StateDictMismatchError(f"{wp}: {KEY_PREFIX + key!r} has dtype {t.dtype}, expected an integer tensor")
        if t.is_floating_point() and t.dtype not in _READABLE_FLOAT_DTYPES:
            raise StateDictMismatchError(
                f"{wp}: {KEY_PREFIX + key!r} has dtype {t.dtype}, which lohakit cannot convert for {slot.reason} "
                f"(expected one of {', '.join(str(d).removeprefix('torch.') for d in _READABLE_FLOAT_DTYPES)})"
            )
        try:
            finite = tensor_is_finite(t)
        except TypeError as e:
            raise StateDictMismatchError(f"{wp}: {KEY_PREFIX + key!r}: {e}") from None
        if not finite:
            nonfinite.append(key)
    if nonfinite:
        msg = f"{wp}: {len(nonfinite)} tensor(s) hold NaN or inf: {_listing(nonfinite)}"
        if strict:
            raise NonFiniteTensorError(msg + " (strict=True)")
        warnings.warn(msg, NonFiniteTensorWarning, stacklevel=3)
    return tensors


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------
def _save_dtype(save_dtype: Union[torch.dtype, str, None]) -> torch.dtype:
    if save_dtype is None:
        return torch.float32
    if isinstance(save_dtype, torch.dtype) and save_dtype in _SAVE_DTYPES.values():
        return save_dtype
    if isinstance(save_dtype, str) and save_dtype.lower().removeprefix("torch.") in _SAVE_DTYPES:
        return _SAVE_DTYPES[save_dtype.lower().removeprefix("torch.")]
    raise ValueError(f"save_dtype must be None, float32, float16 or bfloat16 (dtype or name), got {save_dtype!r}")


def peft_state_dict(model: LoHaModel, adapter_name: str, save_dtype: Union[torch.dtype, str, None] = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys (``base_model.model.<path>.hada_w1_a``).

    Factors are cast to ``save_dtype`` (default float32); modules_to_save copies keep their dtype.
    """
    dtype = _save_dtype(save_dtype)
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.loha_layers():
        for name in LoHaLayer.adapter_layer_names:
            params = getattr(layer, name)
            if adapter_name in params:
                out[f"{KEY_PREFIX}{path}.{name}"] = params[adapter_name].detach().to(dtype)
    for path, wrapper in model._wrappers():
        if adapter_name in wrapper.modules_to_save:
            for k, t in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{KEY_PREFIX}{path}.{k}"] = t.detach()
    return out


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(model, "name_or_path", None)
    return value if isinstance(value, str) and value else None


def peft_config_dict(config: LoHaConfig) -> dict[str, Any]:
    """``adapter_config.json`` content for ``config`` as PEFT writes it for a saved adapter.

    Inference mode on, ``rank_dropout_scale`` left out at its default (PEFT would warn about
    the unknown key), ``peft_version`` added.
    """
    d = config.to_dict()
    d["inference_mode"] = True
    if d.get("rank_dropout_scale", True) is True:
        d.pop("rank_dropout_scale", None)
    d["peft_version"] = PEFT_FORMAT_VERSION
    return d


def _config_json(model: LoHaModel, adapter_name: str) -> dict[str, Any]:
    d = peft_config_dict(model.peft_config[adapter_name])
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = _name_or_path(model.model)
    base_cls = type(model.model)
    d["auto_mapping"] = (
        {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__} if d.get("task_type") is None else None
    )
    return d


def write_adapter_dirs(payloads: Iterable[tuple[str | os.PathLike, dict[str, Any], Mapping[str, torch.Tensor]]]) -> None:
    """Write ``(directory, config dict, tensors)`` adapter folders in PEFT's layout, all or nothing.

    One transaction (:class:`~lohakit.core.io.StagedWrites` rooted at the directories' common
    parent): every file is staged and fsynced in a hidden ``.lohakit-save-<id>.tmp`` directory,
    a commit record is written, then the files are renamed into place. A failure before the
    commit point leaves the existing files untouched and nothing behind; a crash after it is
    completed by the next save into the directory or the next lohakit load, so the folders
    hold the whole previous save or the whole new one. Concurrent saves run one after the
    other (a directory lock). The files' bytes are exactly PEFT's: nothing is added to them.
    """
    items = list(payloads)
    if not items:
        return
    dirs = [os.path.abspath(d) for d, _, _ in items]
    root = Path(os.path.commonpath(dirs))
    with StagedWrites(root=root) as writes:
        for directory, config, tensors in items:
            data = (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
            writes.stage_safetensors(tensors, Path(directory) / SAFETENSORS_WEIGHTS_NAME, {"format": "pt"})
            writes.stage_bytes(data, Path(directory) / ADAPTER_CONFIG_NAME)
        writes.commit()


def save_pretrained(
    model: LoHaModel,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    save_dtype: Union[torch.dtype, str, None] = None,
    is_main_process: bool = True,
    safe_serialization: bool = True,
) -> None:
    """Write adapters in PEFT's layout (see the module docstring).

    Everything is prepared in memory first, then every file is written to a temporary file
    and renamed into place only after all of them were written: a failure leaves existing
    adapter files untouched and no temporary file behind.

    Args:
        model: The LoHaModel.
        save_directory: Target directory (created if needed).
        selected_adapters: Adapters to save (default: all); ``"default"`` goes into the
            directory itself, any other into ``save_directory/<name>``.
        save_dtype: dtype for the factors: None (float32), float16/bfloat16 (dtype or name).
        is_main_process: Write only when True (distributed training).
        safe_serialization: Must be True: lohakit writes safetensors only.

    Raises:
        ValueError: Unknown adapter names, a bad save_dtype, unfilled (meta) tensors.
        OSError: The filesystem refused (existing files intact).
    """
    if not safe_serialization:
        raise ValueError("lohakit writes adapters as safetensors only (safe_serialization=False is not supported)")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; available: {sorted(model.peft_config)}")
    for n in names:
        _check_name(n)
    dtype = _save_dtype(save_dtype)
    if not is_main_process:
        return
    root = Path(save_directory)
    payloads = []
    for n in names:
        tensors = peft_state_dict(model, n, dtype)
        meta = [k for k, t in tensors.items() if t.is_meta]
        if meta:
            raise ValueError(
                f"adapter {n!r}: tensor(s) {meta[:_MAX_LISTED]} are on the meta device (created with "
                "low_cpu_mem_usage and never loaded); nothing was written"
            )
        directory = root if n == "default" else root / n
        payloads.append((directory, _config_json(model, n), tensors))
    write_adapter_dirs(payloads)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
_CONTAINERS = (dict, list, set)


class _Rollback:
    """What a load may change in a model, recorded so that a failure can put it back.

    For every module: its ``__dict__`` (attributes added or replaced), and the content of every
    dict, list and set in it (``_modules``, ``_parameters``, ``_buffers``, every hook table,
    adapter bookkeeping such as ``peft_config`` and ``targeted_module_names``), restored in
    place so that references to those containers stay valid; and every parameter's
    ``requires_grad``. Tensors the load does not create are never written to, so restoring
    the structure restores the model bit for bit.
    """

    def __init__(self, root: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        for m in root.modules():
            attrs = dict(m.__dict__)
            copies = {k: type(v)(v) if type(v) in (list, set) else v.copy() for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
            self.modules.append((m, attrs, copies))
        self.flags = [(p, p.requires_grad) for p in root.parameters()]

    def restore(self) -> None:
        """Put everything back; a KeyboardInterrupt meanwhile is held until the end."""
        with _deferred_interrupts():
            for m, attrs, copies in self.modules:
                for k in [k for k in m.__dict__ if k not in attrs]:
                    del m.__dict__[k]
                for k, v in attrs.items():
                    if k in copies:
                        saved = copies[k]
                        if _same_content(v, saved):  # untouched (and perhaps immutable: diffusers' FrozenDict)
                            pass
                        elif isinstance(v, list):
                            v[:] = saved
                        else:
                            v.clear()
                            v.update(saved)
                    m.__dict__[k] = v
            for p, flag in self.flags:
                p.requires_grad_(flag)


def _same_content(now: Any, saved: Any) -> bool:
    """Whether a container still holds exactly the saved entries (compared by identity)."""
    if len(now) != len(saved):
        return False
    if isinstance(now, list):
        return all(a is b for a, b in zip(now, saved))
    if isinstance(now, set):
        return now == saved
    return all(k in now and now[k] is v for k, v in saved.items())


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT (main thread only) while the body runs; re-raise it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError, TypeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def _read(
    path: str | os.PathLike, adapter_name: str, strict: bool, subfolder: str | None, revision: str | None, hub_kwargs: dict[str, Any]
) -> tuple[AdapterSource, LoHaConfig, dict[str, torch.Tensor]]:
    _check_name(adapter_name)
    source = resolve_adapter(path, subfolder=subfolder, revision=revision, **hub_kwargs)
    raw_config, raw_weights = read_files_consistently(
        [source.config_path, source.weights_path],
        max_bytes=[MAX_JSON_BYTES, None],
        what=["adapter config", "tensor file"],
        prechecks=[None, _weights_precheck(source.weights_path)],
    )
    config = _parse_adapter_config(raw_config, source.config_path, strict)
    tensors = parse_state_dict_bytes(raw_weights, source.weights_path)
    return source, config, tensors


def read_adapter(
    path: str | os.PathLike,
    subfolder: str | None = None,
    strict: bool = False,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> tuple[AdapterSource, LoHaConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory's config and tensors together, as the loaders do (no model needed).

    For tools that inspect or convert adapters: the two files are read consistently (never
    from two different saves; see :func:`~lohakit.core.io.read_files_consistently`), with every
    check of :func:`read_adapter_config` and :func:`~lohakit.core.io.load_state_dict`.

    Returns:
        (where the files are, the config, the tensors under the file's keys).

    Raises:
        LoHaFormatError: (a subclass) naming the file and the problem.
    """
    return _read(path, "default", strict, subfolder, revision, hub_kwargs)


def _weights_precheck(path: Path) -> Any:
    """For a safetensors file: its header length checked against the cap before it is read."""
    if path.suffix.lower() != ".safetensors":
        return None

    def check(fd: int, st: os.stat_result) -> None:
        _check_safetensors_prefix(os.pread(fd, 8, 0), st.st_size, path)

    return check


def _fill(model: LoHaModel, adapter_name: str, slots: Mapping[str, TensorSlot], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the checked tensors into the freshly created adapter (assign where it is on meta)."""
    per_wrapper: dict[str, dict[str, torch.Tensor]] = {}
    for key, slot in slots.items():
        t = tensors[key]
        if slot.kind == "module":
            per_wrapper.setdefault(slot.module_path, {})[slot.name] = t
            continue
        layer = model.model.get_submodule(slot.module_path)
        params = getattr(layer, slot.name)
        old = params[adapter_name]
        value = t.to(dtype=old.dtype).reshape(old.shape)  # (r, r, k) cores become (r, r, k, 1)
        if old.is_meta:
            device = layer.base_layer.weight.device
            device = torch.device("cpu") if device.type == "meta" else device
            params[adapter_name] = nn.Parameter(value.to(device), requires_grad=old.requires_grad)
        else:
            with torch.no_grad():
                old.copy_(value)
    for path, sd in per_wrapper.items():
        wrapper = model.model.get_submodule(path)
        wrapper.modules_to_save[adapter_name].load_state_dict(sd, strict=True)


def _prepare(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool,
    strict: bool,
    subfolder: str | None,
    revision: str | None,
    hub_kwargs: dict[str, Any],
) -> tuple[AdapterSource, LoHaConfig, dict[str, TensorSlot], dict[str, torch.Tensor]]:
    """Read, resolve and check an adapter against ``model`` without touching it.

    Returns:
        (source, resolved config with ``inference_mode`` set, slots by key, checked tensors by key).
    """
    source, config, tensors = _read(model_id, adapter_name, strict, subfolder, revision, hub_kwargs)
    resolved, slots = plan_adapter(model, config, str(source.config_path))
    checked = check_adapter_tensors(slots, tensors, source.weights_path, source.config_path, strict=strict)
    resolved.inference_mode = not is_trainable
    return source, resolved, slots, checked


def _finish(model: LoHaModel, is_trainable: bool) -> None:
    model._apply_active()
    if not is_trainable:
        model.eval()


def from_pretrained(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    strict: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> LoHaModel:
    """Load a PEFT-format LoHa adapter onto a plain model and return the :class:`LoHaModel`.

    Everything is read and checked before ``model`` is touched; on any error ``model`` is left
    exactly as it was.

    Args:
        model: The base model (not yet wrapped).
        model_id: Adapter directory or Hugging Face Hub repo id.
        adapter_name: Name to give the adapter.
        is_trainable: Keep the factors trainable (and the train/eval mode); else frozen + eval().
        low_cpu_mem_usage: Create the factors on the meta device and assign the loaded tensors.
        strict: Raise on non-finite tensors and on PEFT-only config keys instead of warning.
        subfolder: Folder inside ``model_id`` (e.g. a non-default adapter's name).
        revision: Hub revision.
        **hub_kwargs: Passed to ``huggingface_hub.hf_hub_download``.

    Raises:
        LoHaFormatError: (a subclass) naming the file, key and expectation.
    """
    if isinstance(model, LoHaModel):
        raise TypeError("model is already a LoHaModel; use its load_adapter() to add another adapter")
    source, resolved, slots, checked = _prepare(
        model, model_id, adapter_name, is_trainable, strict, subfolder, revision, hub_kwargs
    )
    rollback = _Rollback(model)
    loha: LoHaModel | None = None
    try:
        loha = LoHaModel(model, resolved, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        _fill(loha, adapter_name, slots, checked)
        _finish(loha, is_trainable)
    except BaseException:
        rollback.restore()
        raise
    logger.info("loaded LoHa adapter %r from %s (%d tensors)", adapter_name, source.origin, len(checked))
    return loha


def load_adapter(
    model: LoHaModel,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    strict: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> None:
    """Add a PEFT-format LoHa adapter to an existing :class:`LoHaModel` (not activated).

    Same checks and guarantees as :func:`from_pretrained`: on any error the model, its
    adapters and their settings are exactly as before.
    """
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
    source, resolved, slots, checked = _prepare(
        model, model_id, adapter_name, is_trainable, strict, subfolder, revision, hub_kwargs
    )
    rollback = _Rollback(model)
    try:
        model.add_adapter(adapter_name, resolved, low_cpu_mem_usage=low_cpu_mem_usage)
        _fill(model, adapter_name, slots, checked)
        _finish(model, is_trainable)
    except BaseException:
        rollback.restore()
        raise
    logger.info("loaded LoHa adapter %r from %s (%d tensors)", adapter_name, source.origin, len(checked))


class _PeftDirectoryStore:
    """PEFT's directory format as the engine's :class:`~lohakit.core.model.AdapterStore`."""

    save_pretrained = staticmethod(save_pretrained)
    from_pretrained = staticmethod(from_pretrained)
    load_adapter = staticmethod(load_adapter)


register_adapter_store(_PeftDirectoryStore())
