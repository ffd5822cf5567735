"""kohya-ss / LyCORIS single-file LoHa adapters (the Stable Diffusion ecosystem's format).

File layout (one ``.safetensors``, no nesting)::

    <kohya name>.hada_w1_a   (out, r)          flat; Tucker: (r, out)
    <kohya name>.hada_w1_b   (r, in/g·prod(k)) flat; Tucker: (r, in/g)
    <kohya name>.hada_w2_a / hada_w2_b         same as branch 1
    <kohya name>.hada_t1 / hada_t2             Tucker cores (r, r, *k); Conv1d: (r, r, k)
    <kohya name>.alpha                         0-dim tensor; scale = alpha / r (1 when absent)

with ``kohya name = (prefix + "." + module path).replace(".", "_")`` and prefixes ``lora_unet``,
``lora_te`` (SD1/2), ``lora_te1`` / ``lora_te2`` (SDXL). The rule is lossy, so keys are mapped
by generating the names of every module of the given models (never by parsing names back).

A runtime applies ``W += multiplier · (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)``.

Loading validates the whole file first (every key, shape and alpha) and changes the models only
when everything fits; a failed load leaves them exactly as they were. Files are read with
safetensors only (never unpickled).
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
from ..core.functional import Geometry, HadaFactors
from ..core.layers import ADAPTER_PARAM_NAMES, LoHaLayer, geometry_of
from .peft import ADAPTER_CONFIG_NAME, KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME, peft_config_dict, write_adapter_dirs

if TYPE_CHECKING:
    from ..core.config import LoHaConfig

logger = logging.getLogger(__name__)

__all__ = [
    "KohyaLoadReport",
    "kohya_name",
    "kohya_name_table",
    "legacy_path_prefix",
    "export_name",
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


#: Model classes whose kohya names carry a path level that newer library versions dropped:
#: transformers 5 removed ``text_model`` from CLIPTextModel, but every SD file names its text
#: encoder modules ``lora_te_text_model_encoder_…``. Such models answer to both names and are
#: saved under the legacy one.
_LEGACY_PATH_PREFIX: dict[str, tuple[str, str]] = {"CLIPTextModel": ("text_model", "text_model.")}


def legacy_path_prefix(model: nn.Module) -> str:
    """The path prefix kohya files use for ``model`` (or a LoHaModel's wrapped model) but its module tree lacks (usually "")."""
    model = _unwrap(model)
    rule = _LEGACY_PATH_PREFIX.get(type(model).__name__)
    if rule is None or hasattr(model, rule[0]):
        return ""
    return rule[1]


def export_name(prefix: str, path: str, model: nn.Module | None = None, names: Mapping[str, str] | None = None) -> str:
    """The kohya name a module is written under.

    Args:
        prefix: kohya prefix of the model (``lora_unet``, ``lora_te``, …).
        path: Module path relative to the (unwrapped) model.
        model: The model, for its legacy path prefix (see :func:`legacy_path_prefix`); None: no prefix.
        names: ``{module path: kohya name}`` overrides (e.g. SDXL's SGM names); an override wins.
    """
    override = (names or {}).get(path)
    if override:
        return override
    return kohya_name(prefix, (legacy_path_prefix(model) if model is not None else "") + path)


def kohya_name_table(
    models: Mapping[str, nn.Module], name_tables: NameTables | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Every kohya module name the models answer to.

    Args:
        models: prefix -> model.
        name_tables: Extra names per prefix (``{kohya name: module path}``), e.g. SGM block names.

    Returns:
        kohya name -> list of (prefix, module path); more than one entry means the lossy name
        rule collides for that name (reported when a file uses it).
    """
    table: dict[str, list[tuple[str, str]]] = {}
    for prefix, model in models.items():
        model = _unwrap(model)
        legacy = legacy_path_prefix(model)
        paths = set()
        for path, _ in _adaptable_modules(model):
            paths.add(path)
            table.setdefault(kohya_name(prefix, path), []).append((prefix, path))
            if legacy:
                table.setdefault(kohya_name(prefix, legacy + path), []).append((prefix, path))
        for name, path in (name_tables or {}).get(prefix, {}).items():
            if path in paths and (prefix, path) not in table.get(name, []):
                table.setdefault(name, []).append((prefix, path))
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
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    return sd, metadata, path


def _group_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split ``name.param`` keys into LoHa modules; keys of anything else (LoRA, norms) are returned apart."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, t in sd.items():
        name, dot, param = key.partition(".")
        if dot and param in LOHA_PARAMS:
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
        raise ValueError(f"kohya module {name!r}: missing key(s) {[f'{name}.{p}' for p in missing]}")
    base = module.base_layer if isinstance(module, LoHaLayer) else module
    geom = geometry_of(base)
    if geom is None:  # pragma: no cover - the name table only lists adaptable modules
        raise ValueError(f"kohya module {name!r} targets {path!r} of type {type(base).__name__}, which LoHa cannot adapt")
    w1a, w1b, w2a, w2b = (g[p] for p in _REQUIRED)
    for p in _REQUIRED:
        if g[p].ndim != 2 or not g[p].is_floating_point():
            raise ValueError(f"kohya key {name}.{p}: expected a 2-D float tensor, got shape {_fmt(g[p].shape)} {g[p].dtype}")
    r = int(w1b.shape[0])
    if int(w2b.shape[0]) != r:
        raise ValueError(
            f"kohya module {name!r}: branch ranks differ (hada_w1_b has {r} rows, hada_w2_b {int(w2b.shape[0])}); "
            "lohakit needs equal ranks"
        )
    if r == 0:
        raise ValueError(f"kohya module {name!r}: rank 0 (hada_w1_b has shape {_fmt(w1b.shape)})")
    has_t1, has_t2 = "hada_t1" in g, "hada_t2" in g
    if has_t2 and not has_t1:
        raise ValueError(f"kohya module {name!r}: has {name}.hada_t2 but no {name}.hada_t1")
    if has_t1 and not has_t2 and not tucker_t1_for_both:
        raise ValueError(
            f"kohya module {name!r}: has {name}.hada_t1 but no {name}.hada_t2; "
            "files from LyCORIS <= 1.9.0 used t1 for both branches: pass tucker_t1_for_both=True"
        )
    tucker = has_t1
    t1 = g.get("hada_t1")
    t2 = t1 if tucker_t1_for_both else g.get("hada_t2")
    k = geom.kernel_size
    if tucker and geom.ndim == 0:
        raise ValueError(f"kohya module {name!r}: Tucker cores (hada_t1/hada_t2) on {path!r}, a linear layer")
    if tucker:
        for pn, t in (("hada_t1", t1), ("hada_t2", t2)):
            ok_shapes = [(r, r, *k)] + ([(r, r, *k, 1)] if geom.ndim == 1 else [])
            if tuple(t.shape) not in ok_shapes or not t.is_floating_point():
                raise ValueError(
                    f"kohya key {name}.{pn}: shape {_fmt(t.shape)} does not fit {path!r} "
                    f"(kernel {_fmt(k)}); expected {' or '.join(_fmt(s) for s in ok_shapes)}"
                )
        t1 = t1.reshape(r, r, *k)
        t2 = t2.reshape(r, r, *k)
    expected = Fn.factor_shapes(geom, r, tucker, conv1d_core_4d=False)
    for p in _REQUIRED:
        if tuple(g[p].shape) != tuple(expected[p]):
            raise ValueError(
                f"kohya key {name}.{p}: shape {_fmt(g[p].shape)} does not fit module {path!r} "
                f"({type(base).__name__} {_fmt(geom.weight_shape)}); expected {_fmt(expected[p])} for rank {r}"
                + (" (Tucker layout)" if tucker else "")
            )
    if "alpha" in g:
        a = g["alpha"]
        if a.numel() != 1 or a.ndim > 1:
            raise ValueError(f"kohya key {name}.alpha: expected a 0-dim tensor, got shape {_fmt(a.shape)}")
        alpha = float(a.reshape(()).float())
        if not math.isfinite(alpha):
            raise ValueError(f"kohya key {name}.alpha: not finite ({alpha})")
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
            raise ValueError(f"kohya module {name!r}: factors contain NaN or inf")
    planned = _Planned(name, prefix, path, factors, r, alpha, tucker, geom)
    if "dora_scale" in g:
        m = g["dora_scale"]
        w_shape = geom.weight_shape
        ones = [1] * (len(w_shape) - 1)
        on_out, on_in = (w_shape[0], *ones), (1, w_shape[1], *ones[1:])
        if geom.transposed:
            raise ValueError(f"kohya key {name}.dora_scale: weight decomposition on transposed (Conv1D) layers is not supported")
        if tuple(m.shape) == on_out:
            planned.dora_on_out = True
        elif tuple(m.shape) == on_in:
            planned.dora_on_out = False
        else:
            raise ValueError(
                f"kohya key {name}.dora_scale: shape {_fmt(m.shape)} does not fit module {path!r}; expected "
                f"{_fmt(on_out)} (per output channel) or {_fmt(on_in)} (per input channel)"
            )
        if not torch.isfinite(m).all():
            raise ValueError(f"kohya key {name}.dora_scale: contains NaN or inf")
        planned.dora_scale = m.detach().float()
    return planned


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
        raise ValueError(
            f"{label}: no LoHa module found (expected keys '<kohya name>.hada_w1_a' etc., "
            f"e.g. 'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a'); first keys: {sample}"
        )
    dora = sorted(f"{n}.dora_scale" for n, g in groups.items() if "dora_scale" in g)
    if dora and not allow_dora:
        raise ValueError(
            f"{label}: weight-decomposed LoHa (DoHa, 'dora_scale' keys) is supported only when merging "
            f"(load_kohya(..., merge=True)), not as a live adapter or a PEFT conversion; "
            f"keys: {dora[:5]}{f' and {len(dora) - 5} more' if len(dora) > 5 else ''}"
        )
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
        if len({h for h in hits}) > 1:
            raise ValueError(
                f"{label}: kohya module name {name!r} is ambiguous: it fits {[f'{p}:{q}' for p, q in hits]}"
            )
        prefix, path = hits[0]
        module = _unwrap(models[prefix]).get_submodule(path)
        try:
            planned.append(_plan_module(name, groups[name], prefix, path, module, tucker_t1_for_both))
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    seen: dict[tuple[str, str], str] = {}
    for p in planned:
        if (p.prefix, p.path) in seen:
            raise ValueError(
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
    strict: bool = False,
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
        strict: Raise if any key of the file is not applied.
        tucker_t1_for_both: Use ``hada_t1`` as the core of both branches (LyCORIS <= 1.9.0 files).
        name_tables: Extra names per prefix ``{kohya name: module path}`` (SDXL's SGM names).
        source: File name to use in messages when a state dict is given.

    Returns:
        A :class:`KohyaLoadReport`.

    Raises:
        ValueError: Unknown key layout, missing keys, shapes that do not fit, bad alpha, dora
            keys without ``merge=True``, ambiguous names, an existing adapter name, or (strict) unused keys. Nothing is
            applied when it raises.
    """
    from ..core.model import _check_adapter_name

    if not merge:
        _check_adapter_name(adapter_name)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ValueError(f"load_kohya: multiplier must be a finite number, got {multiplier!r}")
    sd, metadata, label = read_kohya_file(path_or_state_dict)
    label = source or label
    planned, unused, unmatched = _plan(sd, models, tucker_t1_for_both, name_tables, label, allow_dora=merge)
    if strict and unused:
        raise ValueError(
            f"{label}: {len(unused)} key(s) would not be applied (strict=True): {unused[:10]}"
            + (f"; file modules without a target: {unmatched[:10]}" if unmatched else "")
        )
    if not planned:
        raise ValueError(
            f"{label}: none of the file's {len(unmatched)} LoHa modules matches a module of the models "
            f"(prefixes {sorted(models)}); first file modules: {unmatched[:5]}"
        )
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
        deltas = []
        for p in planned:  # compute every ΔW before touching any weight
            module = _unwrap(models[p.prefix]).get_submodule(p.path)
            weight = module.weight
            if p.dora_scale is not None:
                delta = _doha_merged(weight, p, multiplier) - weight.detach().float()
            else:
                delta = Fn.delta_weight(p.factors, p.geometry, multiplier * p.alpha / p.r)
            deltas.append((weight, delta.detach().to(device=weight.device, dtype=weight.dtype)))
        with torch.no_grad():
            for weight, delta in deltas:
                weight.add_(delta)
    else:
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
    report.matched = {p.name: f"{p.prefix}:{p.path}" for p in planned}
    if unused:
        logger.info("%s: %d key(s) not applied, e.g. %s", label, len(unused), unused[:3])
    return report


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
    for prefix, path, layer in _loha_layers(models):
        if adapter_name not in layer.hada_w1_a:
            continue
        name = export_name(prefix, path, models[prefix], (names or {}).get(prefix))
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
        raise ValueError(f"{label}: {len(unused)} key(s) would be left out (strict=True): {unused[:10]}")
    if not planned:
        raise ValueError(f"{label}: no LoHa module of the file fits the model under prefix {prefix!r}")
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
    report.matched = {p.name: f"{prefix}:{p.path}" for p in planned}
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
        model: Optional; used to find Conv1d layers and legacy name prefixes (CLIPTextModel's
            ``text_model`` under transformers 5).
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
    entries: list[_Entry] = []
    for mpath, g in sorted(modules.items()):
        missing = [p for p in _REQUIRED if p not in g]
        if missing:
            raise ValueError(f"{w_path}: module {mpath!r} lacks {missing}")
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
