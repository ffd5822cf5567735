"""kohya-ss / LyCORIS single-file LoHa adapters (the Stable Diffusion ecosystem's format).

File layout (one ``.safetensors``, no nesting)::

    <kohya name>.hada_w1_a   (out, r)          flat; Tucker: (r, out)
    <kohya name>.hada_w1_b   (r, in/g·prod(k)) flat; Tucker: (r, in/g)
    <kohya name>.hada_w2_a / hada_w2_b         same as branch 1
    <kohya name>.hada_t1 / hada_t2             Tucker cores (r, r, *k); Conv1d: (r, r, k)
    <kohya name>.alpha                         0-dim tensor; scale = alpha / r (1 when absent)

with ``kohya name = (prefix + "." + module path).replace(".", "_")`` and prefixes ``lora_unet``,
``lora_te`` (SD1/2), ``lora_te1`` / ``lora_te2`` (/ ``lora_te3``). The module name is everything
before the last dot, so diffusers-style names (``transformer.transformer_blocks.0.attn.to_q``)
work too. The rule is lossy, so keys are mapped by generating the names of every module of the
given models (never by parsing names back); a model of a known family
(:mod:`lohakit.formats.families`: SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5) answers to every naming its
runtimes use, including original-tree modules that fuse several diffusers modules (split exactly
by rows of ``hada_w1_a`` / ``hada_w2_a``).

A runtime applies ``W += multiplier · (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)``.

Loading validates the whole file first (every key, shape and alpha) and changes the models only
when everything fits; a failed load leaves them exactly as they were. By default every LoHa
module of the file must find its module (no silent partial loads; ``strict=False`` applies the
rest with a warning). Bad files raise :class:`~lohakit.core.io.LoHaFormatError`. Files are read
with safetensors only (never unpickled).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

import torch
import torch.nn as nn

from ..core import functional as Fn
from ..core.io import LoHaFormatError, NonFiniteTensorError, tensor_is_finite
from ..core.functional import Geometry, HadaFactors
from ..core.layers import ADAPTER_PARAM_NAMES, LoHaLayer, geometry_of
from .peft import (
    ADAPTER_CONFIG_NAME, KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME, _deferred_interrupts, _Rollback, peft_config_dict,
    write_adapter_dirs,
)

if TYPE_CHECKING:
    from ..core.config import LoHaConfig

logger = logging.getLogger(__name__)

__all__ = [
    "KohyaLoadReport",
    "kohya_name",
    "kohya_name_table",
    "legacy_path_prefix",
    "export_name",
    "export_names",
    "read_kohya_file",
    "load_kohya",
    "save_kohya",
    "kohya_state_dict",
    "set_kohya_multiplier",
    "remove_kohya_adapter",
    "kohya_to_peft",
    "peft_to_kohya",
    "LOHA_PARAMS",
]

#: Per-module parameter names of a LoHa module in a kohya/LyCORIS file.
LOHA_PARAMS = (*ADAPTER_PARAM_NAMES, "alpha", "dora_scale")
_REQUIRED = ADAPTER_PARAM_NAMES[:4]  # w1a, w1b, w2a, w2b (HadaFactors order)

StateDictOrPath = Union[str, os.PathLike, Mapping[str, torch.Tensor]]
#: prefix -> {kohya module name -> module path}; extra names for a model (e.g. SDXL's SGM names).
NameTables = Mapping[str, Mapping[str, str]]


# ------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------
def kohya_name(prefix: str, path: str) -> str:
    """The kohya module name of ``path`` under ``prefix``: ``(prefix + "." + path)`` with dots as ``_``."""
    return (f"{prefix}.{path}" if path else prefix).replace(".", "_")


def _unwrap(model: nn.Module) -> nn.Module:
    """A LoHaModel's wrapped model (paths are relative to it); any other module unchanged."""
    from ..core.model import LoHaModel

    return model.model if isinstance(model, LoHaModel) else model


def _adaptable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(path, module) for LoHa layers and the layer types LoHa can wrap, not inside a LoHa layer."""
    skip: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(m, LoHaLayer):
            skip.append(path + ".")
            yield path, m
        elif geometry_of(m) is not None:
            yield path, m


#: Text-encoder prefixes outside a known family: prefix -> diffusers-style dotted prefix.
_DEFAULT_TE_DOTTED = {"lora_te": "text_encoder.", "lora_te1": "text_encoder.", "lora_te2": "text_encoder_2.", "lora_te3": "text_encoder_3."}


def legacy_path_prefix(model: nn.Module) -> str:
    """The path prefix kohya files use for ``model``'s modules but its module tree lacks (usually "").

    transformers 5 removed ``text_model`` from CLIPTextModel; files (and ComfyUI, A1111) keep it.
    """
    from .families import CLIP_TEXT_MODEL_LEVEL

    model = _unwrap(model)
    if type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model"):
        return CLIP_TEXT_MODEL_LEVEL
    return ""


def _denoiser_class(models: Mapping[str, nn.Module]) -> str:
    """Class name of the first model of a known family among ``models``."""
    from .families import family_of_model

    return next((type(_unwrap(m)).__name__ for m in models.values() if family_of_model(_unwrap(m)) is not None), "?")


def _family_context(models: Mapping[str, nn.Module]) -> Any:
    """The family of the first denoiser among ``models`` (None when there is none)."""
    from .families import family_of_model

    for m in models.values():
        fam = family_of_model(_unwrap(m))
        if fam is not None:
            return fam
    return None


def _is_text_encoder_prefix(prefix: str) -> bool:
    return prefix.startswith("lora_te")


def export_name(prefix: str, path: str, model: nn.Module | None = None, names: Mapping[str, str] | None = None) -> str:
    """The kohya name a module is written under.

    Text-encoder prefixes (``lora_te*``) write CLIP modules with the ``text_model`` level whether
    or not the model is given and whatever the transformers version (``lora_te_text_model_encoder_
    layers_0_self_attn_q_proj``: the names ComfyUI and A1111 map). A known family's denoiser is
    written under the names its runtimes map (see :mod:`lohakit.formats.families`).

    Args:
        prefix: kohya prefix of the model (``lora_unet``, ``lora_te``, …).
        path: Module path relative to the (unwrapped) model.
        model: The model (its family picks the denoiser names); None: the plain rule.
        names: ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names); an override wins.
    """
    from .families import family_of_model, save_names, text_encoder_save_path

    override = (names or {}).get(path)
    if override:
        return override
    if _is_text_encoder_prefix(prefix):
        return kohya_name(prefix, text_encoder_save_path(path))
    if model is not None and prefix == "lora_unet":
        fam = family_of_model(_unwrap(model))
        if fam is not None:
            return save_names(fam, _unwrap(model), [path])[path]
    return kohya_name(prefix, (legacy_path_prefix(model) if model is not None else "") + path)


def export_names(prefix: str, model: nn.Module, names: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`export_name` for every adaptable module of ``model`` at once (the family table is built once)."""
    from .families import family_of_model, save_names

    inner = _unwrap(model)
    paths = [p for p, _ in _adaptable_modules(inner)]
    fam = family_of_model(inner) if prefix == "lora_unet" else None
    base = save_names(fam, inner, paths) if fam is not None else {}
    return {p: (names or {}).get(p) or base.get(p) or export_name(prefix, p, model) for p in paths}


def kohya_name_table(
    models: Mapping[str, nn.Module], name_tables: NameTables | None = None
) -> dict[str, list[tuple[str, Any]]]:
    """Every file module name the models answer to.

    A model of a known family (:mod:`lohakit.formats.families`) answers to every naming its
    runtimes accept (kohya on the original and the diffusers tree, ``lycoris_``,
    ``lora_transformer_``, ``transformer.`` / ``unet.``, ``diffusion_model.``, bare keys);
    fused original modules map to a :class:`~lohakit.formats.families.Split`. Text encoders
    answer to their kohya prefixes (with and without CLIP's ``text_model`` level) and the
    family's ``text_encoder(_2|_3).`` names. Any model answers to ``kohya_name(prefix, path)``.

    Args:
        models: prefix -> model.
        name_tables: Extra names per prefix (``{name: module path or Split}``).

    Returns:
        name -> list of (prefix, target); more than one distinct entry means the name is
        ambiguous (reported when a file uses it).
    """
    from .families import family_of_model, module_names, text_encoder_names, TextEncoderSlot

    context = _family_context(models)
    table: dict[str, list[tuple[str, Any]]] = {}

    def add(name: str, prefix: str, target: Any) -> None:
        hits = table.setdefault(name, [])
        if (prefix, target) not in hits:
            hits.append((prefix, target))

    for prefix, model in models.items():
        model = _unwrap(model)
        paths = [path for path, _ in _adaptable_modules(model)]
        fam = family_of_model(model)
        if fam is not None:
            for name, targets in module_names(fam, model, paths).items():
                for t in targets:
                    add(name, prefix, t)
            for path in paths:
                add(kohya_name(prefix, path), prefix, path)
        else:
            slot = context.slot_for(prefix) if context is not None else None
            if slot is None and prefix in _DEFAULT_TE_DOTTED:
                slot = TextEncoderSlot(prefix, (prefix,), (_DEFAULT_TE_DOTTED[prefix],))
            for path in paths:
                for name in text_encoder_names(slot, prefix, path):
                    add(name, prefix, path)
        have = set(paths)
        for name, target in (name_tables or {}).get(prefix, {}).items():
            needed = getattr(target, "paths", (target,))
            if all(p in have for p in needed):
                add(name, prefix, target)
    return table


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def read_kohya_file(path_or_state_dict: StateDictOrPath) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors and header metadata of a kohya file (safetensors only), or a given state dict.

    Returns:
        (state dict, metadata, a label for messages).
    """
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
        bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"kohya state dict: keys must be str and values tensors; offending keys: {bad[:5]}")
        return sd, {}, "<state dict>"
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kohya file {path!r} does not exist")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: only .safetensors kohya files are read (pickled .ckpt/.pt files are never loaded)")
    from ..core.io import load_safetensors_with_metadata

    # one checked read (regular file, header cap before reading): CorruptFileError etc. name the file
    sd, metadata = load_safetensors_with_metadata(path)
    return sd, metadata, path


def _group_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split ``name.param`` keys (``param`` after the last dot) into LoHa modules; keys of anything else
    (LoRA, norms) are returned apart."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, t in sd.items():
        name, dot, param = key.rpartition(".")
        if dot and name and param in LOHA_PARAMS:
            groups.setdefault(name, {})[param] = t
        else:
            other.append(key)
    loha = {n: g for n, g in groups.items() if any(p.startswith("hada_") for p in g)}
    for n, g in groups.items():
        if n not in loha:  # e.g. the .alpha of a plain LoRA module
            other.extend(f"{n}.{p}" for p in g)
    return loha, sorted(other)


@dataclass
class KohyaLoadReport:
    """What :func:`load_kohya` did.

    Attributes:
        adapter_name: Name of the created adapter (None when merged).
        merged: Whether the weights were merged into the base layers.
        matched: kohya module name -> "prefix:module path" for every applied module.
        unused_keys: File keys that were not applied (plain LoRA keys, norms, modules with no target).
        unmatched_modules: LoHa modules of the file with no module in the given models.
        metadata: The file's header metadata.
    """

    adapter_name: str | None
    merged: bool
    matched: dict[str, str] = field(default_factory=dict)
    unused_keys: list[str] = field(default_factory=list)
    unmatched_modules: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"kohya load: {len(self.matched)} modules {'merged' if self.merged else f'as adapter {self.adapter_name!r}'}, "
            f"{len(self.unused_keys)} unused keys, {len(self.unmatched_modules)} file modules without target"
        )


@dataclass
class _Planned:
    """One validated LoHa module, ready to apply (factors in lohakit's layout, float32)."""

    name: str
    prefix: str
    path: str
    factors: HadaFactors
    r: int
    alpha: float
    tucker: bool
    geometry: Geometry
    #: DoHa magnitude (float32, broadcastable to the weight) and its axis: True = per output row.
    dora_scale: torch.Tensor | None = None
    dora_on_out: bool = True


def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _plan_module(
    name: str, g: dict[str, torch.Tensor], prefix: str, path: str, module: nn.Module, tucker_t1_for_both: bool
) -> _Planned:
    """Validate one file module against its target and convert it to lohakit's layout."""
    missing = [p for p in _REQUIRED if p not in g]
    if missing:
        raise LoHaFormatError(f"kohya module {name!r}: missing key(s) {[f'{name}.{p}' for p in missing]}")
    base = module.base_layer if isinstance(module, LoHaLayer) else module
    geom = geometry_of(base)
    if geom is None:  # pragma: no cover - the name table only lists adaptable modules
        raise LoHaFormatError(f"kohya module {name!r} targets {path!r} of type {type(base).__name__}, which LoHa cannot adapt")
    w1a, w1b, w2a, w2b = (g[p] for p in _REQUIRED)
    for p in _REQUIRED:
        if g[p].ndim != 2 or not g[p].is_floating_point():
            raise LoHaFormatError(f"kohya key {name}.{p}: expected a 2-D float tensor, got shape {_fmt(g[p].shape)} {g[p].dtype}")
    r = int(w1b.shape[0])
    if int(w2b.shape[0]) != r:
        raise LoHaFormatError(
            f"kohya module {name!r}: branch ranks differ (hada_w1_b has {r} rows, hada_w2_b {int(w2b.shape[0])}); "
            "lohakit needs equal ranks"
        )
    if r == 0:
        raise LoHaFormatError(f"kohya module {name!r}: rank 0 (hada_w1_b has shape {_fmt(w1b.shape)})")
    has_t1, has_t2 = "hada_t1" in g, "hada_t2" in g
    if has_t2 and not has_t1:
        raise LoHaFormatError(f"kohya module {name!r}: has {name}.hada_t2 but no {name}.hada_t1")
    if has_t1 and not has_t2 and not tucker_t1_for_both:
        raise LoHaFormatError(
            f"kohya module {name!r}: has {name}.hada_t1 but no {name}.hada_t2; "
            "files from LyCORIS <= 1.9.0 used t1 for both branches: pass tucker_t1_for_both=True"
        )
    tucker = has_t1
    t1 = g.get("hada_t1")
    t2 = t1 if tucker_t1_for_both else g.get("hada_t2")
    k = geom.kernel_size
    if tucker and geom.ndim == 0:
        raise LoHaFormatError(f"kohya module {name!r}: Tucker cores (hada_t1/hada_t2) on {path!r}, a linear layer")
    if tucker:
        for pn, t in (("hada_t1", t1), ("hada_t2", t2)):
            ok_shapes = [(r, r, *k)] + ([(r, r, *k, 1)] if geom.ndim == 1 else [])
            if tuple(t.shape) not in ok_shapes or not t.is_floating_point():
                raise LoHaFormatError(
                    f"kohya key {name}.{pn}: shape {_fmt(t.shape)} does not fit {path!r} "
                    f"(kernel {_fmt(k)}); expected {' or '.join(_fmt(s) for s in ok_shapes)}"
                )
        t1 = t1.reshape(r, r, *k)
        t2 = t2.reshape(r, r, *k)
    expected = Fn.factor_shapes(geom, r, tucker, conv1d_core_4d=False)
    for p in _REQUIRED:
        if tuple(g[p].shape) != tuple(expected[p]):
            raise LoHaFormatError(
                f"kohya key {name}.{p}: shape {_fmt(g[p].shape)} does not fit module {path!r} "
                f"({type(base).__name__} {_fmt(geom.weight_shape)}); expected {_fmt(expected[p])} for rank {r}"
                + (" (Tucker layout)" if tucker else "")
            )
    if "alpha" in g:
        a = g["alpha"]
        if a.numel() != 1 or a.ndim > 1:
            raise LoHaFormatError(f"kohya key {name}.alpha: expected a 0-dim tensor, got shape {_fmt(a.shape)}")
        alpha = float(a.reshape(()).float())
        if not math.isfinite(alpha):
            raise LoHaFormatError(f"kohya key {name}.alpha: not finite ({alpha})")
    else:
        alpha = float(r)  # scale 1, as ComfyUI/A1111 do when alpha is absent
    f32 = [x.detach().to(torch.float32) for x in (w1a, w1b, w2a, w2b)]
    if tucker and geom.kernel_numel == 1:
        # a 1x1 core is a plain matrix: W_i = (t_i^T-contracted a_i)^T b_i, exactly a flat LoHa
        c1, c2 = t1.reshape(r, r).float(), t2.reshape(r, r).float()
        f32 = [f32[0].T @ c1, f32[1], f32[2].T @ c2, f32[3]]  # (out, r), (r, in) per branch
        tucker, t1, t2 = False, None, None
    if tucker:
        factors = HadaFactors(*f32, t1.detach().float(), t2.detach().float())
    else:
        factors = HadaFactors(*f32)
    for t in factors:
        if t is not None and not torch.isfinite(t).all():
            raise LoHaFormatError(f"kohya module {name!r}: factors contain NaN or inf")
    planned = _Planned(name, prefix, path, factors, r, alpha, tucker, geom)
    if "dora_scale" in g:
        m = g["dora_scale"]
        w_shape = geom.weight_shape
        ones = [1] * (len(w_shape) - 1)
        on_out, on_in = (w_shape[0], *ones), (1, w_shape[1], *ones[1:])
        if geom.transposed:
            raise LoHaFormatError(f"kohya key {name}.dora_scale: weight decomposition on transposed (Conv1D) layers is not supported")
        if tuple(m.shape) == on_out:
            planned.dora_on_out = True
        elif tuple(m.shape) == on_in:
            planned.dora_on_out = False
        else:
            raise LoHaFormatError(
                f"kohya key {name}.dora_scale: shape {_fmt(m.shape)} does not fit module {path!r}; expected "
                f"{_fmt(on_out)} (per output channel) or {_fmt(on_in)} (per input channel)"
            )
        if not tensor_is_finite(m):  # (any dtype, float8 included)
            raise LoHaFormatError(f"kohya key {name}.dora_scale: contains NaN or inf")
        planned.dora_scale = m.detach().float()
    return planned


def _target_str(target: Any) -> str:
    return target if isinstance(target, str) else " + ".join(target.paths)


def _split_group(name: str, g: dict[str, torch.Tensor], split: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """One fused file module as exact LoHas on the pieces: rows of hada_w1_a / hada_w2_a sliced
    (after the half swap where the trees order the halves differently); w1_b, w2_b, cores and
    alpha shared.

    Raises:
        LoHaFormatError: The rows do not add up to the pieces' rows, or a weight-decomposition
            scale per input channel (no exact split).
    """
    from .families import describe_rows, split_rows

    missing = [p for p in _REQUIRED if p not in g]
    if missing:
        raise LoHaFormatError(f"kohya module {name!r}: missing key(s) {[f'{name}.{p}' for p in missing]}")
    tucker = "hada_t1" in g
    rows_of = (lambda t: t.T) if tucker else (lambda t: t)  # Tucker stores w_a as (r, out)
    for p in ("hada_w1_a", "hada_w2_a"):
        t = g[p]
        n = int(rows_of(t).shape[0]) if t.ndim == 2 else -1
        if n != split.rows:
            raise LoHaFormatError(
                f"kohya key {name}.{p}: shape {_fmt(t.shape)} has {n} output rows, but the module fuses "
                f"{describe_rows(split)} = {split.rows} rows"
            )
    pieces = {p: split_rows(split, rows_of(g[p])) for p in ("hada_w1_a", "hada_w2_a")}
    dora = None
    if "dora_scale" in g:
        m = g["dora_scale"]
        if m.ndim < 1 or int(m.shape[0]) != split.rows:
            raise LoHaFormatError(
                f"kohya key {name}.dora_scale: shape {_fmt(m.shape)}; a fused module splits exactly only with a "
                f"per-output-row scale ({split.rows}, 1)"
            )
        dora = split_rows(split, m)
    out = []
    for i, (path, _) in enumerate(split.pieces):
        sub = dict(g)
        for p in ("hada_w1_a", "hada_w2_a"):
            piece = pieces[p][i]
            sub[p] = (piece.T if tucker else piece).contiguous()
        if dora is not None:
            sub["dora_scale"] = dora[i].contiguous()
        out.append((path, sub))
    return out


def _check_one_family(groups: Mapping[str, Any], label: str) -> None:
    """Refuse a file whose module names belong to two model families."""
    from .families import guess_file_family

    _, evidence = guess_file_family(groups)
    if len(evidence) > 1:
        from .families import family_by_name

        shown = "; ".join(f"{family_by_name(f).label}: {names}" for f, names in evidence.items())
        raise LoHaFormatError(f"{label}: the file mixes module names of {len(evidence)} model families ({shown}); one file is for one model")


def _plan(
    sd: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module],
    tucker_t1_for_both: bool,
    name_tables: NameTables | None,
    label: str,
    allow_dora: bool = False,
) -> tuple[list[_Planned], list[str], list[str]]:
    """Validate a whole file; returns (planned modules, unused keys, unmatched module names)."""
    if not models:
        raise ValueError("load_kohya: `models` is empty; give {prefix: model}, e.g. {'lora_unet': unet}")
    for prefix, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"load_kohya: models[{prefix!r}] must be an nn.Module, got {type(m).__name__}")
    groups, other = _group_keys(sd)
    if not groups:
        sample = sorted(sd)[:5]
        raise LoHaFormatError(
            f"{label}: no LoHa module found (expected keys '<kohya name>.hada_w1_a' etc., "
            f"e.g. 'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a'); first keys: {sample}"
        )
    dora = sorted(f"{n}.dora_scale" for n, g in groups.items() if "dora_scale" in g)
    if dora and not allow_dora:
        raise LoHaFormatError(
            f"{label}: weight-decomposed LoHa (DoHa, 'dora_scale' keys) is supported only when merging "
            f"(load_kohya(..., merge=True)), not as a live adapter or a PEFT conversion; "
            f"keys: {dora[:5]}{f' and {len(dora) - 5} more' if len(dora) > 5 else ''}"
        )
    _check_one_family(groups, label)
    table = kohya_name_table(models, name_tables)
    planned: list[_Planned] = []
    unmatched: list[str] = []
    unused = list(other)
    for name in sorted(groups):
        hits = table.get(name, [])
        if not hits:
            unmatched.append(name)
            unused.extend(f"{name}.{p}" for p in groups[name])
            continue
        if len(hits) > 1:
            raise LoHaFormatError(
                f"{label}: file module name {name!r} is ambiguous: it fits {[f'{p}:{_target_str(q)}' for p, q in hits]}"
            )
        prefix, target = hits[0]
        model = _unwrap(models[prefix])
        try:
            if isinstance(target, str):
                planned.append(_plan_module(name, groups[name], prefix, target, model.get_submodule(target), tucker_t1_for_both))
            else:
                for path, g in _split_group(name, groups[name], target):
                    planned.append(_plan_module(name, g, prefix, path, model.get_submodule(path), tucker_t1_for_both))
        except LoHaFormatError as e:
            wrong = _wrong_family(groups, models)
            raise LoHaFormatError(f"{label}: {wrong}; first misfit: {e}" if wrong else f"{label}: {e}") from None
    seen: dict[tuple[str, str], str] = {}
    for p in planned:
        if (p.prefix, p.path) in seen:
            raise LoHaFormatError(
                f"{label}: modules {seen[(p.prefix, p.path)]!r} and {p.name!r} both target {p.prefix}:{p.path}"
            )
        seen[(p.prefix, p.path)] = p.name
    return planned, sorted(unused), unmatched


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def _wrap(model: nn.Module, path: str, module: nn.Module) -> LoHaLayer:
    """The LoHa layer at ``path``, wrapping the base module if needed (returns it, not yet installed)."""
    from ..core.model import LoHaModel

    if isinstance(module, LoHaLayer):
        return module
    cls = LoHaModel._layer_class_for(module)
    if cls is None:  # pragma: no cover - filtered by the name table
        raise TypeError(f"LoHa cannot adapt module {path!r} of type {type(module).__name__}")
    return cls(module, module_name=path)


def _install(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_kohya(
    path_or_state_dict: StateDictOrPath,
    models: Mapping[str, nn.Module],
    multiplier: float = 1.0,
    adapter_name: str = "default",
    merge: bool = False,
    strict: bool = True,
    tucker_t1_for_both: bool = False,
    *,
    name_tables: NameTables | None = None,
    source: str | None = None,
) -> KohyaLoadReport:
    """Apply a kohya/LyCORIS LoHa file to models, as a live adapter or merged into the weights.

    Each file module ``m`` with factors and alpha gives
    ``ΔW = multiplier · (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)`` (Tucker: the branch products
    are ``t_i ×₁ w_ia ×₂ w_ib``), r = ``hada_w1_b.shape[0]``, scale 1 when ``.alpha`` is absent.

    Args:
        path_or_state_dict: A ``.safetensors`` file or an already loaded state dict.
        models: prefix -> model, e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``. Models
            may already hold LoHa layers (from lohakit) or be LoHaModels.
        multiplier: Strength; folded into each layer's scaling (not into alpha).
        adapter_name: Name of the live adapter (must not exist yet on the targets).
        merge: Add ΔW to the base weights (float32 math, cast once) instead of a live adapter.
            Weight-decomposed files (``dora_scale``, DoHa) load only this way, merged as
            LyCORIS defines it (see :func:`_doha_merged`).
        strict: True (default): raise, before changing anything, if any key of the file would not
            be applied (LoHa modules with no target are named with the nearest names the models
            answer to). False: apply what fits, ``warnings.warn`` about the rest; the report
            lists it (``unmatched_modules``, ``unused_keys``).
        tucker_t1_for_both: Use ``hada_t1`` as the core of both branches (LyCORIS <= 1.9.0 files).
        name_tables: Extra names per prefix ``{kohya name: module path}`` (SDXL's SGM names).
        source: File name to use in messages when a state dict is given.

    Returns:
        A :class:`KohyaLoadReport`.

    Raises:
        LoHaFormatError: Unknown key layout, missing keys, shapes that do not fit, bad alpha, dora
            keys without ``merge=True``, ambiguous names, fused rows that do not add up, a file of
            another model family or of two families, or (strict) keys left out. Nothing is
            applied when it raises.
        ValueError: An existing adapter name or a bad multiplier.
    """
    from ..core.model import _check_adapter_name

    if not merge:
        _check_adapter_name(adapter_name)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ValueError(f"load_kohya: multiplier must be a finite number, got {multiplier!r}")
    sd, metadata, label = read_kohya_file(path_or_state_dict)
    label = source or label
    planned, unused, unmatched = _plan(sd, models, tucker_t1_for_both, name_tables, label, allow_dora=merge)
    _check_left_out(sd, models, name_tables, planned, unused, unmatched, label, strict)
    if not merge:
        clash = [
            f"{p.prefix}:{p.path}"
            for p in planned
            if isinstance(m := _unwrap(models[p.prefix]).get_submodule(p.path), LoHaLayer) and adapter_name in m.hada_w1_a
        ]
        from ..core.model import LoHaModel

        clash += [f"{prefix} (LoHaModel)" for prefix, m in models.items() if isinstance(m, LoHaModel) and adapter_name in m.peft_config]
        if clash:
            raise ValueError(f"adapter {adapter_name!r} already exists on {clash[:5]}; choose another adapter_name")
    report = KohyaLoadReport(adapter_name=None if merge else adapter_name, merged=merge, metadata=metadata)
    report.unused_keys, report.unmatched_modules = unused, unmatched
    if merge:
        merged = []
        for p in planned:  # compute every new weight (and check it) before touching any
            module = _unwrap(models[p.prefix]).get_submodule(p.path)
            weight = module.weight
            with torch.no_grad():
                if p.dora_scale is not None:
                    delta = _doha_merged(weight, p, multiplier) - weight.float()
                else:
                    delta = Fn.delta_weight(p.factors, p.geometry, multiplier * p.alpha / p.r)
                new = weight + delta.to(device=weight.device, dtype=weight.dtype)
            if not tensor_is_finite(new):
                raise NonFiniteTensorError(
                    f"kohya module {p.name!r} -> {p.prefix}:{p.path}: merging it (multiplier {multiplier}) would write "
                    "NaN or inf into the weight; nothing was changed (load it live, merge=False, to inspect it)"
                )
            merged.append((weight, new))
        with _deferred_interrupts(), torch.no_grad():  # Ctrl-C waits until every weight is written
            for weight, new in merged:
                weight.copy_(new)
    else:
        rollbacks = [_Rollback(m) for m in models.values()]  # any exception, Ctrl-C included: put it all back
        try:
            _apply_live(planned, models, adapter_name, multiplier)
        except BaseException:
            for rb in rollbacks:
                rb.restore()
            raise
    report.matched = _matched(planned)
    return report


def _apply_live(planned: list[_Planned], models: Mapping[str, nn.Module], adapter_name: str, multiplier: float) -> None:
    """Install the planned modules as live LoHa layers of adapter ``adapter_name`` (no checks left to do)."""
    for p in planned:
        model = _unwrap(models[p.prefix])
        module = model.get_submodule(p.path)
        layer = _wrap(model, p.path, module)
        device = layer.base_layer.weight.device
        layer.update_layer(adapter_name, r=p.r, alpha=p.alpha, init_weights=True,
                           use_effective_conv2d=p.tucker, device="meta")
        for pname, t in zip(ADAPTER_PARAM_NAMES, p.factors):
            if t is None:
                continue
            target_shape = getattr(layer, pname)[adapter_name].shape
            getattr(layer, pname)[adapter_name] = nn.Parameter(t.reshape(target_shape).to(device).contiguous())
        layer.scaling[adapter_name] = multiplier * p.alpha / p.r
        keep = [a for a in layer.active_adapters if a in layer.hada_w1_a and a != adapter_name]
        trainable = getattr(layer, "_trainable", True) if keep else False
        layer.set_adapter([*keep, adapter_name], trainable=trainable)
        if layer is not module:
            _install(model, p.path, layer)
    _register_in_loha_models(models, planned, adapter_name)


def _matched(planned: list[_Planned]) -> dict[str, str]:
    """file module name -> "prefix:path" (fused modules: "prefix:path1 + path2 + …")."""
    out: dict[str, list[str]] = {}
    for p in planned:
        out.setdefault(p.name, [p.prefix]).append(p.path)
    return {n: f"{v[0]}:{' + '.join(v[1:])}" for n, v in out.items()}


def _nearest(names: list[str], table: Mapping[str, Any], n: int = 3) -> dict[str, list[str]]:
    """For a few unmatched names, the closest names the models answer to (difflib ratio)."""
    import difflib

    pool = list(table)
    return {name: difflib.get_close_matches(name, pool, n=n, cutoff=0.6) for name in names}


def _wrong_family(groups: Mapping[str, Any], models: Mapping[str, nn.Module]) -> str | None:
    """"this is a <family> file …, but the model is <family>" when the file's names give away
    another family than the models' (asked only once something does not fit), else None."""
    from .families import guess_file_family

    model_family = _family_context(models)
    file_family, evidence = guess_file_family(groups)
    if model_family is None or file_family is None or file_family.name == model_family.name:
        return None
    return (
        f"this is a {file_family.label} file (module names {evidence[file_family.name]}), but the model is "
        f"{model_family.label} ({_denoiser_class(models)})"
    )


def _check_left_out(
    sd: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module],
    name_tables: NameTables | None,
    planned: list[_Planned],
    unused: list[str],
    unmatched: list[str],
    label: str,
    strict: bool,
) -> None:
    """No silent partial loads: raise (strict) or warn about every file key that would not be applied.

    An unmatched file whose names give away another model family than the models' raises in
    either mode, naming both families.
    """
    import warnings

    if unmatched:
        groups, _ = _group_keys(sd)
        wrong = _wrong_family(groups, models)
        if wrong:
            raise LoHaFormatError(f"{label}: {wrong}; {len(unmatched)} of its {len(groups)} LoHa modules match nothing")
    if not planned:
        table = kohya_name_table(models, name_tables)
        near = _nearest(unmatched[:3], table)
        raise LoHaFormatError(
            f"{label}: none of the file's {len(unmatched)} LoHa modules matches a module of the models "
            f"(prefixes {sorted(models)}); first file modules: {unmatched[:5]}; nearest names the models answer to: {near}"
        )
    other = [k for k in unused if k.rpartition(".")[0] not in set(unmatched)]
    if not unused:
        return
    parts = []
    if unmatched:
        table = kohya_name_table(models, name_tables)
        parts.append(
            f"{len(unmatched)} LoHa module(s) of the file match no module of the models (prefixes {sorted(models)}): "
            f"{unmatched[:5]}{' …' if len(unmatched) > 5 else ''}; nearest names the models answer to: {_nearest(unmatched[:3], table)}"
        )
    if other:
        parts.append(f"{len(other)} key(s) are not LoHa tensors (LoRA, norms, …): {other[:5]}{' …' if len(other) > 5 else ''}")
    msg = f"{label}: " + "; ".join(parts)
    if strict:
        raise LoHaFormatError(msg + f"; nothing was applied (pass strict=False to apply the {len(planned)} module(s) that fit and leave these out)")
    warnings.warn(msg + f"; left out, the {len(planned)} module(s) that fit were applied (strict=False)", stacklevel=3)


def _config_for(planned: list[_Planned], **extra: Any) -> "LoHaConfig":
    """A LoHaConfig describing these modules: most common r/alpha, exact-path patterns for the rest."""
    from ..core.config import LoHaConfig

    tucker = [p.path for p in planned if p.tucker]
    flat_k = [p.path for p in planned if not p.tucker and p.geometry.ndim > 0 and p.geometry.kernel_numel > 1]
    if tucker and flat_k:
        raise ValueError(
            f"the file mixes Tucker convs ({tucker[:3]}) with flat k>1 convs ({flat_k[:3]}); PEFT's "
            "use_effective_conv2d is one switch for all convs, so it has no LoHaConfig/PEFT form"
        )
    r, rank_pattern = _patterns_from({p.path: p.r for p in planned})
    alpha, alpha_pattern = _patterns_from({p.path: p.alpha for p in planned})
    return LoHaConfig(
        r=int(r), alpha=alpha, target_modules=sorted(p.path for p in planned), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, use_effective_conv2d=bool(tucker), **extra,
    )


def _register_in_loha_models(models: Mapping[str, nn.Module], planned: list[_Planned], adapter_name: str) -> None:
    """Make a LoHaModel given in ``models`` know the loaded adapter (peft_config, active adapters)."""
    from ..core.model import LoHaModel

    for prefix, m in models.items():
        if not isinstance(m, LoHaModel):
            continue
        mine = [p for p in planned if p.prefix == prefix]
        if not mine:
            continue
        try:
            m.peft_config[adapter_name] = _config_for(mine, inference_mode=True)
        except ValueError:
            # no single LoHaConfig describes the file (mixed Tucker/flat convs); layers still work
            logger.warning("adapter %r: the file has no LoHaConfig form; it is not registered in the LoHaModel", adapter_name)
            continue
        m.targeted_module_names = sorted({*m.targeted_module_names, *(p.path for p in mine)})
        m.active_adapter = [*m.active_adapters, adapter_name]


def _doha_merged(weight: torch.Tensor, p: _Planned, multiplier: float) -> torch.Tensor:
    """LyCORIS' weight-decomposed merge, in float32.

    ``W' = (W + ΔW) · (multiplier · (m / (‖W + ΔW‖ + eps) − 1) + 1)`` with ΔW at scale
    alpha / r (the multiplier only blends the decomposition, as in LyCORIS), the norm taken
    per output row (``dora_scale`` shaped ``(out, 1, …)``) or per input channel ``(1, in, …)``.
    """
    with torch.no_grad():
        w = weight.detach().float() + Fn.delta_weight(p.factors, p.geometry, p.alpha / p.r).to(weight.device)  # (out, in, *k)
        eps = torch.finfo(torch.float32).eps
        if p.dora_on_out:
            norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1)) + eps
        else:
            norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.ndim - 2)) + eps
        scale = p.dora_scale.to(w.device) / norm
        scale = multiplier * (scale - 1) + 1
        return w * scale


def _loha_layers(models: Mapping[str, nn.Module]) -> Iterable[tuple[str, str, LoHaLayer]]:
    for prefix, model in models.items():
        for path, m in _adaptable_modules(_unwrap(model)):
            if isinstance(m, LoHaLayer):
                yield prefix, path, m


def set_kohya_multiplier(models: Mapping[str, nn.Module], adapter_name: str, multiplier: float) -> int:
    """Set the strength of a loaded adapter: scaling = multiplier · alpha / r on every layer holding it.

    Merged layers are unmerged, rescaled and merged again. Returns the number of layers changed.
    """
    layers = [layer for _, _, layer in _loha_layers(models) if adapter_name in layer.hada_w1_a]
    if not layers:
        raise ValueError(f"no layer holds adapter {adapter_name!r}")
    for layer in layers:
        merged = list(layer.merged_adapters)
        if merged:
            layer.unmerge()
        layer.scaling[adapter_name] = multiplier * layer.alpha[adapter_name] / layer.r[adapter_name]
        if merged:
            layer.merge(adapter_names=merged)
    return len(layers)


def remove_kohya_adapter(models: Mapping[str, nn.Module], adapter_name: str | None = None) -> int:
    """Delete a loaded adapter (all adapters when None); layers left without adapters are unwrapped.

    Merged adapters are unmerged first, so the base weights come back as they were.
    Returns the number of layers touched.
    """
    from ..core.model import LoHaModel

    touched = 0
    removed: set[str] = set()
    for prefix, path, layer in list(_loha_layers(models)):
        names = layer.adapter_names if adapter_name is None else [a for a in layer.adapter_names if a == adapter_name]
        if not names:
            continue
        touched += 1
        if layer.merged_adapters:
            layer.unmerge()
        for n in names:
            layer.delete_adapter(n)
        removed.update(names)
        if not layer.adapter_names:
            _install(_unwrap(models[prefix]), path, layer.base_layer)
    for m in models.values():  # keep a LoHaModel's bookkeeping in step
        if isinstance(m, LoHaModel):
            for n in removed & set(m.peft_config):
                del m.peft_config[n]
            left = [a for a in m.active_adapters if a in m.peft_config]
            m.active_adapter = left[0] if len(left) == 1 else (left or next(iter(m.peft_config), "default"))
    return touched


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------
def _most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass
class _Entry:
    """One module to write: kohya name, tensors in the file's layout, rank, alpha, kind."""

    name: str
    tensors: dict[str, torch.Tensor]
    r: int
    alpha: float
    conv_k: bool
    tucker: bool


def _entries_state_dict(entries: list[_Entry], dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (cast to ``dtype``, alpha as 0-dim) and the ss_* metadata describing them."""
    sd: dict[str, torch.Tensor] = {}
    for e in entries:
        for p, t in e.tensors.items():
            t = t.detach().to("cpu")
            sd[f"{e.name}.{p}"] = (t.to(dtype) if dtype is not None else t.float()).contiguous()
        sd[f"{e.name}.alpha"] = torch.tensor(e.alpha, dtype=dtype or torch.float32)
    linear_ra = [(e.r, e.alpha) for e in entries if not e.conv_k]
    conv_ra = [(e.r, e.alpha) for e in entries if e.conv_k]
    dim, alpha = _most_common(linear_ra, None) or _most_common(conv_ra, (0, 0.0))
    args: dict[str, str] = {"algo": "loha"}
    if conv_ra:
        cdim, calpha = _most_common(conv_ra, (0, 0.0))
        args.update(conv_dim=str(cdim), conv_alpha=_num(calpha))
    args["use_tucker"] = "true" if any(e.tucker for e in entries) else "false"
    from .. import __version__

    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(args),
        "lohakit_version": __version__,
    }
    return sd, metadata


def kohya_state_dict(
    models: Mapping[str, nn.Module],
    adapter_name: str = "default",
    dtype: torch.dtype | None = torch.float16,
    *,
    names: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya tensors of one adapter and the ss_* metadata describing them.

    Args:
        models: prefix -> model holding LoHa layers.
        adapter_name: Which adapter.
        dtype: Storage dtype (factors and alpha); None keeps float32.
        names: Per prefix ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names).

    Returns:
        (state dict, metadata).
    """
    entries: list[_Entry] = []
    owner: dict[str, str] = {}
    table = {prefix: export_names(prefix, m, (names or {}).get(prefix)) for prefix, m in models.items()}
    for prefix, path, layer in _loha_layers(models):
        if adapter_name not in layer.hada_w1_a:
            continue
        name = table[prefix][path]
        if name in owner:
            raise ValueError(f"modules {owner[name]!r} and {prefix}:{path!r} both get the kohya name {name!r}")
        owner[name] = f"{prefix}:{path}"
        f = layer.factors(adapter_name)
        if f.w1a.is_meta:
            raise ValueError(f"{prefix}:{path}: adapter {adapter_name!r} has no weights yet (meta tensors)")
        geom = layer.geometry
        tensors = {"hada_w1_a": f.w1a, "hada_w1_b": f.w1b, "hada_w2_a": f.w2a, "hada_w2_b": f.w2b}
        if f.tucker:
            k = geom.kernel_size
            tensors["hada_t1"] = f.t1.reshape(*f.t1.shape[:2], *k)  # LyCORIS' Conv1d core is 3-D
            tensors["hada_t2"] = f.t2.reshape(*f.t2.shape[:2], *k)
        entries.append(_Entry(name, tensors, layer.r[adapter_name], float(layer.alpha[adapter_name]),
                              geom.ndim > 0 and geom.kernel_numel > 1, f.tucker))
    if not entries:
        raise ValueError(f"no LoHa layer holds adapter {adapter_name!r} in models {sorted(models)}")
    return _entries_state_dict(entries, dtype)


def save_kohya(
    path: str | os.PathLike,
    models: Mapping[str, nn.Module],
    adapter_name: str = "default",
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    *,
    names: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, str]:
    """Write one adapter as a kohya/LyCORIS LoHa ``.safetensors`` (loads in ComfyUI and A1111).

    Alpha is the adapter's own alpha (a load multiplier is a runtime strength and is not
    saved). The write is atomic: a failed save leaves an existing file untouched.

    Args:
        path: Target ``.safetensors`` file.
        models: prefix -> model, e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``.
        adapter_name: Which adapter to write.
        dtype: Storage dtype (default float16 as kohya); None keeps float32.
        metadata: Extra header entries (strings only), e.g. ``{"ss_base_model_version": "sd_v1"}``;
            they override the generated ss_* values.
        names: Per prefix ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names).

    Returns:
        The metadata written.
    """
    path, extra = _check_output("save_kohya", path, metadata)
    sd, meta = kohya_state_dict(models, adapter_name, dtype, names=names)
    return _write_kohya_file(sd, path, meta, extra)


def _check_output(caller: str, path: str | os.PathLike, metadata: Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
    """Validate a kohya output file name and the extra header entries before any work is done.

    Returns:
        (path as a string, the extra metadata as a dict).

    Raises:
        ValueError: ``path`` does not end with ``.safetensors``, or a metadata key/value is not a string.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{caller}: {path!r} must end with .safetensors")
    extra = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"{caller}: metadata keys and values must be strings; offending entries: {bad}")
    return path, extra


def _write_kohya_file(sd: dict[str, torch.Tensor], path: str, meta: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """Write ``sd`` atomically with ``meta`` overridden by ``extra``; returns the metadata written."""
    from ..core.io import save_state_dict

    meta = {**meta, **extra}
    save_state_dict(sd, path, meta)
    return meta


# ------------------------------------------------------------------------------------------
# Conversion kohya file <-> PEFT directory
# ------------------------------------------------------------------------------------------


def _exact_pattern(path: str) -> str:
    """A rank/alpha_pattern key that matches exactly this module path (PEFT's ``(.*\\.)?(key)$`` rule)."""
    import re

    return "^" + re.escape(path)


def _patterns_from(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Most common value as the default; exact-path overrides for the others."""
    default = _most_common(list(values.values()), None)
    return default, {_exact_pattern(p): v for p, v in sorted(values.items()) if v != default}


def kohya_to_peft(
    path_or_state_dict: StateDictOrPath,
    model: nn.Module,
    save_directory: str | os.PathLike,
    prefix: str = "lora_unet",
    *,
    base_model_name_or_path: str | None = None,
    tucker_t1_for_both: bool = False,
    name_table: Mapping[str, str] | None = None,
    strict: bool = False,
) -> tuple["LoHaConfig", KohyaLoadReport]:
    """Convert the part of a kohya LoHa file under ``prefix`` into a PEFT LoHa directory for ``model``.

    The model is needed because kohya names are lossy (they are matched against its modules);
    it is not modified. r / alpha are the most common per-module values, the others go into
    ``rank_pattern`` / ``alpha_pattern`` with exact-path keys (``^<escaped path>``).

    Args:
        path_or_state_dict: kohya file or state dict.
        model: The model the PEFT adapter is for (e.g. ``pipe.unet``).
        save_directory: Output directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        prefix: Which kohya prefix belongs to ``model``.
        base_model_name_or_path: Written into the config.
        tucker_t1_for_both: For Tucker files from LyCORIS <= 1.9.0.
        name_table: Extra ``{kohya name: module path}`` names (SDXL's SGM names).
        strict: Raise if any key of the file is left out.

    Returns:
        The written :class:`~lohakit.core.config.LoHaConfig` and a report (keys of other prefixes are unused).
    """
    sd, metadata, label = read_kohya_file(path_or_state_dict)
    planned, unused, unmatched = _plan(
        sd, {prefix: model}, tucker_t1_for_both, {prefix: dict(name_table)} if name_table else None, label
    )
    if strict and unused:
        raise LoHaFormatError(f"{label}: {len(unused)} key(s) would be left out (strict=True): {unused[:10]}")
    if not planned:
        near = _nearest(unmatched[:3], kohya_name_table({prefix: model}, {prefix: dict(name_table)} if name_table else None))
        raise LoHaFormatError(
            f"{label}: no LoHa module of the file fits the model under prefix {prefix!r}; first file modules: "
            f"{unmatched[:5]}; nearest names the model answers to: {near}"
        )
    try:
        config = _config_for(planned, inference_mode=True, base_model_name_or_path=base_model_name_or_path)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    for p in planned:
        for pname, t in zip(ADAPTER_PARAM_NAMES, p.factors):
            if t is None:
                continue
            if pname in ("hada_t1", "hada_t2") and p.geometry.ndim == 1:
                t = t.reshape(*t.shape, 1)  # PEFT stores Conv1d cores as (r, r, k, 1)
            tensors[f"{KEY_PREFIX}{p.path}.{pname}"] = t.float().contiguous()
    write_adapter_dirs([(save_directory, peft_config_dict(config), tensors)])
    report = KohyaLoadReport(adapter_name=None, merged=False, metadata=metadata, unused_keys=unused, unmatched_modules=unmatched)
    report.matched = _matched(planned)
    return config, report


def peft_to_kohya(
    peft_directory: str | os.PathLike,
    path: str | os.PathLike,
    prefix: str = "lora_unet",
    *,
    model: nn.Module | None = None,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Convert a PEFT LoHa directory into a kohya/LyCORIS file under ``prefix``.

    Alpha per module comes from the config (``alpha`` / ``alpha_pattern``), rank from the
    tensors. PEFT stores Conv1d Tucker cores as ``(r, r, k, 1)``; give ``model`` to write them
    in LyCORIS' 3-D layout (without it they are written as stored).

    Args:
        peft_directory: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        path: Output ``.safetensors``.
        prefix: kohya prefix for the model (``lora_unet``, ``lora_te``, …).
        model: Optional; used to find Conv1d layers and the family's names (a FLUX/SD3
            transformer's modules are written ``lora_transformer_<path>``; without the model the
            paths tell the family when they can). Text encoders are written with CLIP's
            ``text_model`` level with or without the model.
        dtype: Storage dtype.
        metadata: Extra header entries (strings).
        names: ``{module path: kohya name}`` overrides (SDXL's SGM names).

    Returns:
        The metadata written.
    """
    from ..core.config import LoHaConfig
    from ..core.targets import rank_and_alpha

    out_path, extra = _check_output("peft_to_kohya", path, metadata)
    folder = os.fspath(peft_directory)
    cfg_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    w_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    for f in (cfg_path, w_path):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"PEFT directory {folder!r} has no {os.path.basename(f)}")
    config = LoHaConfig.from_json_file(cfg_path)
    sd, _, _ = read_kohya_file(w_path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign: list[str] = []
    for key, t in sd.items():
        if not key.startswith(KEY_PREFIX):
            foreign.append(key)
            continue
        mpath, _, param = key[len(KEY_PREFIX):].rpartition(".")
        if param not in LOHA_PARAMS or not mpath:
            foreign.append(key)
            continue
        modules.setdefault(mpath, {})[param] = t
    if foreign:
        raise ValueError(
            f"{w_path}: key(s) a kohya LoHa file cannot hold (modules_to_save copies or unknown layout): {foreign[:5]}"
        )
    if not modules:
        raise ValueError(f"{w_path}: no LoHa tensors")
    conv1d = set()
    if model is not None:
        conv1d = {p for p, m in _adaptable_modules(_unwrap(model)) if isinstance(getattr(m, "base_layer", m), nn.Conv1d)}
    if model is None and prefix == "lora_unet" and not names:
        # no model: a DiT family's module paths still tell the family, and so the names its runtimes map
        from .families import guess_file_family

        fam, _ = guess_file_family(list(modules))
        style = fam.save_style if fam is not None else None
        if fam is None and any(m.startswith("transformer_blocks.") for m in modules):
            style = "lora_transformer_"  # a DiT's top-level blocks (FLUX and SD3 are both written this way)
        if style not in (None, "kohya", "original"):
            names = {mpath: f"{style}{mpath.replace('.', '_')}" for mpath in modules}
    entries: list[_Entry] = []
    for mpath, g in sorted(modules.items()):
        missing = [p for p in _REQUIRED if p not in g]
        if missing:
            raise LoHaFormatError(f"{w_path}: module {mpath!r} lacks {missing}")
        r = int(g["hada_w1_b"].shape[0])
        _, alpha = rank_and_alpha(config, mpath)
        tensors = {p: g[p] for p in (*_REQUIRED, "hada_t1", "hada_t2") if p in g}
        tucker = "hada_t1" in tensors
        if tucker and mpath in conv1d:
            for p in ("hada_t1", "hada_t2"):
                if tensors[p].ndim == 4 and tensors[p].shape[-1] == 1:
                    tensors[p] = tensors[p].reshape(tensors[p].shape[:3])
        conv_k = tucker  # without the model a flat conv cannot be told from a linear layer
        if model is not None:
            try:
                m = _unwrap(model).get_submodule(mpath)
                geom = geometry_of(getattr(m, "base_layer", m))
                conv_k = geom is not None and geom.ndim > 0 and geom.kernel_numel > 1
            except AttributeError:
                pass
        name = export_name(prefix, mpath, model, names)
        entries.append(_Entry(name, tensors, r, float(alpha), conv_k, tucker))
    out, meta = _entries_state_dict(entries, dtype)
    return _write_kohya_file(out, out_path, meta, extra)
