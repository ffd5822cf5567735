"""Load kohya/LyCORIS LoHa files straight into diffusers pipelines (and their bare models).

diffusers' own ``load_lora_weights`` rejects ``hada_*`` keys; these functions apply them as
live, switchable LoHa adapters on the pipeline's denoiser and text encoders, for every family in
:mod:`lohakit.formats.families`:

* SD 1.x / 2.x (``pipe.unet``, ``pipe.text_encoder``): ``lora_unet`` (diffusers or LDM names),
  ``lora_te`` (or ``lora_te1``).
* SDXL (``text_encoder_2``; the UNet's ``addition_embed_type`` is ``text_time``): ``lora_unet``
  (SGM or diffusers names), ``lora_te1`` / ``lora_te2``.
* FLUX.1 (``pipe.transformer`` a ``FluxTransformer2DModel``): BFL names (kohya), diffusers names
  (``transformer.``, ``lora_transformer_``, ``lycoris_``, bare); CLIP ``lora_te1``, T5 ``lora_te2``.
* SD3/3.5 (``SD3Transformer2DModel``): SAI names or diffusers names; CLIP-L ``lora_te1``,
  CLIP-G ``lora_te2``, T5 ``lora_te3``.

``pipe`` may be a pipeline, any object with those attributes, or a bare denoiser model.
diffusers itself is not imported here.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..core.io import NonFiniteTensorError
from ..core.model import LoHaModel, register_wrap_hook, use_base_state_dict_keys
from ..formats.peft import _deferred_interrupts, _Rollback
from ..formats.families import Family, family_of_model, family_of_pipeline
from ..formats.families.stable_diffusion import sgm_unet_names
from ..formats.kohya import (
    KohyaLoadReport,
    StateDictOrPath,
    export_names,
    load_kohya,
    read_kohya_file,
    remove_kohya_adapter,
    save_kohya,
    set_kohya_multiplier,
    _loha_layers,
    _unwrap,
)

__all__ = [
    "load_loha_weights",
    "unload_loha_weights",
    "set_loha_scale",
    "save_loha_weights",
    "save_loha_as_lora",
    "pipeline_models",
    "sgm_unet_names",
]


def pipeline_models(pipe: Any) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]], str]:
    """The kohya prefixes of a pipeline's models (or of a bare denoiser).

    Returns:
        (prefix -> model, extra name tables (empty: the families carry their names), family id:
        ``"sd"``, ``"sdxl"``, ``"flux"`` or ``"sd3"``).

    Raises:
        TypeError: ``pipe`` is neither a model of a known family nor has a ``unet`` /
            ``transformer`` of one.
    """
    fam: Family | None
    if isinstance(pipe, nn.Module):
        fam = family_of_model(pipe)
        if fam is None:
            raise TypeError(
                f"{type(_unwrap(pipe)).__name__} is not a denoiser of a known family "
                "(UNet2DConditionModel, FluxTransformer2DModel, SD3Transformer2DModel); use load_kohya(file, {prefix: model})"
            )
        return {"lora_unet": pipe}, {}, fam.name
    fam = family_of_pipeline(pipe)
    if fam is None:
        found = {a: type(getattr(pipe, a)).__name__ for a in ("unet", "transformer") if getattr(pipe, a, None) is not None}
        raise TypeError(
            f"pipeline {type(pipe).__name__} has no `unet` / `transformer` of a known family"
            + (f" (found {found})" if found else "")
            + "; LoHa files need an SD 1.x/2.x, SDXL, FLUX.1 or SD3 pipeline"
        )
    models: dict[str, nn.Module] = {"lora_unet": getattr(pipe, fam.component)}
    for slot in fam.text_encoders:
        te = getattr(pipe, slot.attribute, None)
        if isinstance(te, nn.Module):
            models[slot.save_prefix] = te
    return models, {}, fam.name


def load_loha_weights(
    pipe: Any,
    path: StateDictOrPath,
    adapter_name: str = "default",
    scale: float = 1.0,
    fuse: bool = False,
    strict: bool = True,
    tucker_t1_for_both: bool = False,
) -> KohyaLoadReport:
    """Apply a kohya/LyCORIS LoHa file to a pipeline (or bare denoiser) as adapter ``adapter_name``.

    ``W += scale · (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)`` on every module of the file.

    Args:
        pipe: A StableDiffusion(XL)Pipeline, FluxPipeline, StableDiffusion3Pipeline, any object
            with their ``unet`` / ``transformer`` and ``text_encoder*`` attributes, or a bare
            UNet2DConditionModel / FluxTransformer2DModel / SD3Transformer2DModel.
        path: ``.safetensors`` file or state dict.
        adapter_name: Name of the adapter (must be new).
        scale: Strength (the kohya multiplier); change later with :func:`set_loha_scale`.
        fuse: Merge into the weights right away (still reversible with
            :func:`unload_loha_weights`).
        strict: True: raise before changing anything if any key of the file would not be
            applied; False: apply the rest with a warning (listed in the report).
        tucker_t1_for_both: For Tucker files from LyCORIS <= 1.9.0.

    The adapted models keep their own state-dict keys (as after
    :func:`lohakit.inject_adapter_in_model`): ``state_dict()`` leaves out the adapter tensors
    and the ``base_layer`` level, so ``pipe.save_pretrained`` still writes a pipeline that
    diffusers loads (the base weights, or the merged ones while fused). Save the adapter with
    :func:`save_loha_weights`.

    Returns:
        The :class:`~lohakit.formats.kohya.KohyaLoadReport`.

    Raises:
        LoHaFormatError: The file is for another model family (SDXL file into SD1, SD3 into
            FLUX, …; both are named), has an unknown layout, shapes that do not fit, or (strict)
            modules that match nothing; the pipeline is left untouched.
    """
    models, tables, _ = pipeline_models(pipe)
    sd, metadata, label = read_kohya_file(path)
    rollbacks = [_Rollback(m) for m in models.values()] if fuse else []
    report = load_kohya(
        sd, models, multiplier=scale, adapter_name=adapter_name, strict=strict,
        tucker_t1_for_both=tucker_t1_for_both, name_tables=tables, source=label,
    )
    report.metadata = metadata
    layers = [(f"{prefix}:{path}", layer) for prefix, path, layer in _loha_layers(models) if adapter_name in layer.hada_w1_a]
    try:
        for model in models.values():
            if not isinstance(model, LoHaModel):  # a LoHaModel's own state_dict speaks PEFT's keys
                use_base_state_dict_keys(model)
        if fuse:
            _check_fusable(layers, adapter_name, label)
    except BaseException:
        for rb in rollbacks:  # the load and the fuse as one: the pipeline as it was, bit for bit
            rb.restore()
        raise
    if fuse:  # every merged weight checked: write them all, a Ctrl-C meanwhile held until the last
        with _deferred_interrupts():
            for _, layer in layers:
                layer.merge(adapter_names=[adapter_name])
    return report


def _check_fusable(layers: list[tuple[str, Any]], adapter_name: str, source: str) -> None:
    """Compute every merged weight W + ΔW on a copy; a non-finite one raises naming its module."""
    for name, layer in layers:
        try:
            layer.merged_weight([adapter_name])  # computed on a copy, checked, dropped
        except ValueError:
            raise NonFiniteTensorError(f"{source}: fusing module {name} would write NaN or inf into its weight; nothing was "
                                       "loaded or fused (load it without fuse to inspect it)") from None


def set_loha_scale(pipe: Any, scale: float, adapter_name: str = "default") -> None:
    """Change the strength of a loaded adapter (fused adapters are re-fused at the new strength)."""
    models, _, _ = pipeline_models(pipe)
    set_kohya_multiplier(models, adapter_name, scale)


def unload_loha_weights(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (all when None): fused weights are unfused, unused wrappers removed."""
    models, _, _ = pipeline_models(pipe)
    if remove_kohya_adapter(models, adapter_name) == 0 and adapter_name is not None:
        raise ValueError(f"pipeline has no LoHa adapter {adapter_name!r}")


def _export_setup(
    pipe: Any, metadata: Mapping[str, str] | None
) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]], dict[str, str]]:
    """(prefix -> model, per prefix {module path: kohya name} overrides, header metadata) for writing a file."""
    from ..formats.families import family_by_name

    models, _, kind = pipeline_models(pipe)
    names = {prefix: export_names(prefix, model) for prefix, model in models.items()}
    meta = {"ss_base_model_version": family_by_name(kind).base_model_version, **(metadata or {})}
    return models, names, meta


def save_loha_weights(
    pipe: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write a pipeline's adapter as a kohya LoHa file, one entry per adapted module (never fused).

    Names ComfyUI maps: SD 1.x/2.x ``lora_unet_`` + diffusers path and ``lora_te_``; SDXL SGM
    names and ``lora_te1_`` / ``lora_te2_``; FLUX.1 and SD3 ``lora_transformer_`` + diffusers
    path, text encoders ``lora_te1_`` / ``lora_te2_`` (/ ``lora_te3_`` for SD3's T5). CLIP text
    encoders are always written with the ``text_model`` level.
    """
    models, names, meta = _export_setup(pipe, metadata)
    return save_kohya(path, models, adapter_name=adapter_name, dtype=dtype, metadata=meta, names=names)


def save_loha_as_lora(
    pipe: Any,
    path: str | os.PathLike,
    rank: int | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Write a pipeline's LoHa adapter as a LoRA file (exact, or compressed to ``rank``).

    Names per family, so that LoRA-only runtimes can serve the adapter: SD 1.x/2.x and SDXL as
    kohya LoRA (``lora_unet_…`` (SGM names for SDXL), ``lora_te…``; diffusers' ``load_lora_weights``,
    ComfyUI and A1111 read it). FLUX.1 and SD3: the transformer and CLIP encoders in diffusers'
    PEFT keys (``transformer.<path>.lora_A.weight`` / ``lora_B.weight``,
    ``text_encoder(_2).text_model.….lora_A.weight``; scale 1, no alpha), which diffusers and
    ComfyUI both read; T5 encoders as kohya ``lora_te2_`` (FLUX) / ``lora_te3_`` (SD3), which
    ComfyUI reads (diffusers has no T5 LoRA for these pipelines).

    Returns:
        file module name -> relative Frobenius error of the export (0.0 when exact).
    """
    from ..formats.families import family_by_name, text_encoder_save_path
    from ..formats.kohya import _check_output, _write_kohya_file
    from .lora import lora_kohya_name, lora_kohya_state_dict, lora_peft_state_dict, to_lora

    models, names, meta = _export_setup(pipe, metadata)
    exports = {}
    for prefix, model in models.items():
        if any(adapter_name in layer.hada_w1_a for _, _, layer in _loha_layers({prefix: model})):
            exports[prefix] = to_lora(_unwrap(model), rank=rank, adapter_name=adapter_name)
    if not exports:
        raise ValueError(f"pipeline has no LoHa adapter {adapter_name!r}")
    path, extra = _check_output("save_loha_as_lora", path, meta)
    fam = family_by_name(pipeline_models(pipe)[2])
    peft_style: dict[str, str] = {}  # prefix -> dotted key prefix, for the parts written in diffusers' PEFT keys
    if fam.component == "transformer":
        peft_style["lora_unet"] = "transformer."
        for slot in fam.text_encoders:
            te = models.get(slot.save_prefix)
            if te is not None and "CLIP" in type(_unwrap(te)).__name__:
                peft_style[slot.save_prefix] = slot.diffusers_prefixes[0]
    kohya_part = {p: e for p, e in exports.items() if p not in peft_style}
    te_paths = [q for p, ex in kohya_part.items() if p.startswith("lora_te") for q in ex]
    if te_paths and not any(q.endswith("out_proj") for q in te_paths):
        import warnings

        warnings.warn(
            "save_loha_as_lora: the text-encoder LoRA has no out_proj module; diffusers' load_lora_weights "
            "(0.42) then cannot infer the file's format and loads nothing, UNet included (ComfyUI and A1111 "
            "read it). Adapt out_proj too, or load the UNet part only.",
            stacklevel=2,
        )
    sd: dict[str, torch.Tensor] = {}
    out_meta = {"ss_network_module": "networks.lora"}
    if kohya_part:
        sd, out_meta = lora_kohya_state_dict(kohya_part, dtype, names, models)
    errors = {lora_kohya_name(p, q, names, models): e.rel_error for p, ex in kohya_part.items() for q, e in ex.items()}
    for prefix, dotted in peft_style.items():
        if prefix not in exports:
            continue
        ex = exports[prefix]
        if prefix != "lora_unet":
            ex = {text_encoder_save_path(q): e for q, e in ex.items()}
        part = lora_peft_state_dict(ex, prefix=dotted)
        sd.update({k: (v.to(dtype) if dtype is not None else v) for k, v in part.items()})
        errors.update({f"{dotted}{q}": e.rel_error for q, e in ex.items()})
    _write_kohya_file(sd, path, out_meta, extra)
    return errors


# ---------------------------------------------------------------------- a LoHaModel inside a pipeline
def _wrapped_components(pipe: Any) -> list[tuple[str, str]]:
    """(component name, wrapped class) of every pipeline component that is a LoHaModel."""
    found = []
    config = getattr(pipe, "config", None)
    for name, entry in (dict(config) if isinstance(config, dict) else {}).items():
        if name.startswith("_") or not isinstance(entry, (tuple, list)):
            continue
        comp = pipe.__dict__[name] if name in pipe.__dict__ else getattr(pipe, name, None)
        comp = getattr(comp, "_orig_mod", comp)  # torch.compile's wrapper
        if isinstance(comp, LoHaModel):
            found.append((name, type(comp.model).__name__))
    return found


def _refuse_wrapped_components(pipe: Any) -> None:
    found = _wrapped_components(pipe)
    if not found:
        return
    names = ", ".join(f"{n!r} (a LoHaModel wrapping {cls})" for n, cls in found)
    first = found[0][0]
    raise TypeError(
        f"{type(pipe).__name__}.save_pretrained: component {names} is not a class diffusers can save and load back "
        f"as a pipeline component; nothing was written. Either adapt the model in place so it keeps its class "
        f"(pipe.{first} = lohakit.inject_adapter_in_model(config, base_model); pipe.save_pretrained(dir) then saves "
        f"the pipeline with the base weights), or save the adapter alone: "
        f"lohakit.diffusers.save_loha_weights(pipe, 'adapter.safetensors') (kohya/LyCORIS file) or "
        f"pipe.{first}.save_pretrained(dir) (PEFT format)"
    )


def _guard_pipeline_saves() -> None:
    """Make ``DiffusionPipeline.save_pretrained`` refuse a pipeline holding a LoHaModel, before it writes.

    diffusers saves a pipeline's components one by one (the VAE first) and looks at a
    component only when its turn comes; a LoHaModel is no diffusers or transformers class, so
    it would be skipped with a long warning, ``model_index.json`` would record it as
    ``[null, null]``, and the saved pipeline would not load. Nothing the component exposes is
    read before the first files are written, so the check has to sit in front of
    ``save_pretrained`` itself: the method is wrapped once (only when diffusers is already
    imported; nothing else changes), and the wrapper checks the components, then calls the
    original.
    """
    if "diffusers" not in sys.modules:
        return  # no diffusers model can be wrapped before diffusers is imported
    utils = sys.modules.get("diffusers.pipelines.pipeline_utils")
    if utils is None:  # a model was loaded without any pipeline: the class the pipeline will have is patched now
        import importlib

        utils = importlib.import_module("diffusers.pipelines.pipeline_utils")
    pipeline_cls = getattr(utils, "DiffusionPipeline", None)
    original = getattr(pipeline_cls, "__dict__", {}).get("save_pretrained")
    if original is None or getattr(original, "_lohakit_guard", False):
        return

    @functools.wraps(original)
    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_wrapped_components(self)
        return original(self, save_directory, *args, **kwargs)

    save_pretrained._lohakit_guard = True  # type: ignore[attr-defined]
    pipeline_cls.save_pretrained = save_pretrained


register_wrap_hook(_guard_pipeline_saves)
