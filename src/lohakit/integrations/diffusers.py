"""Load kohya/LyCORIS LoHa files straight into diffusers Stable Diffusion pipelines.

diffusers' own ``load_lora_weights`` rejects ``hada_*`` keys; these functions apply them as
live, switchable LoHa adapters on ``pipe.unet`` and the text encoders:

* SD 1.x / 2.x (``StableDiffusionPipeline``): ``lora_unet`` (diffusers module names) and
  ``lora_te``.
* SDXL (``StableDiffusionXLPipeline``, recognised by ``pipe.text_encoder_2``): ``lora_unet``
  with the original SGM block names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``;
  diffusers-style names are accepted too), ``lora_te1`` and ``lora_te2``.

SGM names are generated from the UNet's own block structure (:func:`sgm_unet_names`), never
parsed back from file keys; a test checks the table against diffusers' SGM→diffusers key
converter. Any object with ``unet`` / ``text_encoder`` (/ ``text_encoder_2``) attributes works
as ``pipe``. diffusers itself is not imported here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..formats.kohya import (
    KohyaLoadReport,
    StateDictOrPath,
    load_kohya,
    read_kohya_file,
    remove_kohya_adapter,
    save_kohya,
    set_kohya_multiplier,
    _loha_layers,
    _unwrap,
)
from ..formats.families.stable_diffusion import SGM_BLOCK_WORDS, sgm_unet_names

__all__ = [
    "load_loha_weights",
    "unload_loha_weights",
    "set_loha_scale",
    "save_loha_weights",
    "save_loha_as_lora",
    "pipeline_models",
    "sgm_unet_names",
]

def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_models(pipe: Any) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]], str]:
    """The kohya prefixes of a pipeline's models.

    Returns:
        (prefix -> model, extra name tables, "sdxl" or "sd").
    """
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"pipeline {type(pipe).__name__} has no `unet` module; LoHa files need a UNet pipeline")
    if _is_sdxl(pipe):
        models = {"lora_unet": unet}
        if isinstance(getattr(pipe, "text_encoder", None), nn.Module):
            models["lora_te1"] = pipe.text_encoder
        models["lora_te2"] = pipe.text_encoder_2
        return models, {"lora_unet": sgm_unet_names(_unwrap(unet))}, "sdxl"
    models = {"lora_unet": unet}
    if isinstance(getattr(pipe, "text_encoder", None), nn.Module):
        models["lora_te"] = pipe.text_encoder
    return models, {}, "sd"


def _file_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in sd:
        name = key.partition(".")[0]
        for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"):
            if name.startswith(p):
                out.setdefault(p[:-1], []).append(key)
                break
        else:
            out.setdefault("?", []).append(key)
    return out


def _check_file_fits(sd: Mapping[str, torch.Tensor], kind: str, label: str) -> None:
    """Refuse files written for another pipeline family, naming the keys that show it."""
    prefixes = _file_prefixes(sd)
    if "?" in prefixes:
        raise ValueError(
            f"{label}: keys outside the kohya SD prefixes (lora_unet_, lora_te_, lora_te1_, lora_te2_): "
            f"{prefixes['?'][:5]}"
        )
    unet_keys = prefixes.get("lora_unet", [])
    sgm = [k for k in unet_keys if any(w in k for w in SGM_BLOCK_WORDS)]
    if kind == "sd":
        sdxl = prefixes.get("lora_te1", []) + prefixes.get("lora_te2", []) + sgm
        if sdxl:
            raise ValueError(
                f"{label}: this file is for SDXL (keys {sdxl[:3]}), but the pipeline is SD 1.x/2.x "
                "(one text encoder, diffusers UNet names)"
            )
    elif prefixes.get("lora_te"):
        raise ValueError(
            f"{label}: this file is for SD 1.x/2.x (keys {prefixes['lora_te'][:3]}), but the pipeline is SDXL "
            "(text encoders lora_te1 / lora_te2)"
        )


def load_loha_weights(
    pipe: Any,
    path: StateDictOrPath,
    adapter_name: str = "default",
    scale: float = 1.0,
    fuse: bool = False,
    strict: bool = False,
    tucker_t1_for_both: bool = False,
) -> KohyaLoadReport:
    """Apply a kohya/LyCORIS LoHa file to a Stable Diffusion pipeline as adapter ``adapter_name``.

    ``W += scale · (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)`` on every module of the file.

    Args:
        pipe: A StableDiffusionPipeline / StableDiffusionXLPipeline (or an object with ``unet``,
            ``text_encoder`` and for SDXL ``text_encoder_2``).
        path: ``.safetensors`` file or state dict.
        adapter_name: Name of the adapter (must be new).
        scale: Strength (the kohya multiplier); change later with :func:`set_loha_scale`.
        fuse: Merge into the weights right away (still reversible with
            :func:`unload_loha_weights`).
        strict: Raise if any key of the file is not applied.
        tucker_t1_for_both: For Tucker files from LyCORIS <= 1.9.0.

    Returns:
        The :class:`~lohakit.formats.kohya.KohyaLoadReport`.

    Raises:
        ValueError: The file is for another pipeline family (SDXL file into SD1, …), has an
            unknown layout or shapes that do not fit; the pipeline is left untouched.
    """
    models, tables, kind = pipeline_models(pipe)
    sd, metadata, label = read_kohya_file(path)
    _check_file_fits(sd, kind, label)
    report = load_kohya(
        sd, models, multiplier=scale, adapter_name=adapter_name, strict=strict,
        tucker_t1_for_both=tucker_t1_for_both, name_tables=tables, source=label,
    )
    report.metadata = metadata
    if fuse:
        for _, _, layer in _loha_layers(models):
            if adapter_name in layer.hada_w1_a:
                layer.merge(adapter_names=[adapter_name])
    return report


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
    models, tables, kind = pipeline_models(pipe)
    names = {p: {path: name for name, path in t.items()} for p, t in tables.items()}
    meta = {"ss_base_model_version": "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1", **(metadata or {})}
    return models, names, meta


def save_loha_weights(
    pipe: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write a pipeline's adapter as a kohya LoHa file (SGM UNet names and te1/te2 for SDXL)."""
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
    """Write a pipeline's LoHa adapter as a kohya LoRA file (exact, or compressed to ``rank``).

    Names follow the pipeline family (SGM UNet names and ``lora_te1``/``lora_te2`` for SDXL), so
    LoRA-only runtimes, diffusers' ``load_lora_weights`` included, can serve the adapter.

    Returns:
        kohya module name -> relative Frobenius error of the export (0.0 when exact).
    """
    from .lora import lora_kohya_name, save_lora_kohya, to_lora

    models, names, meta = _export_setup(pipe, metadata)
    exports = {}
    for prefix, model in models.items():
        if any(adapter_name in layer.hada_w1_a for _, _, layer in _loha_layers({prefix: model})):
            exports[prefix] = to_lora(_unwrap(model), rank=rank, adapter_name=adapter_name)
    if not exports:
        raise ValueError(f"pipeline has no LoHa adapter {adapter_name!r}")
    save_lora_kohya(path, exports, dtype=dtype, metadata=meta, names=names, models=models)
    return {lora_kohya_name(prefix, p, names, models): e.rel_error for prefix, ex in exports.items() for p, e in ex.items()}
