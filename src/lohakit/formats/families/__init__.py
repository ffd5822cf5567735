"""Model families as data: how each family's LoHa files name modules, mapped onto the
diffusers/transformers module tree.

A :class:`Family` says how to recognise the model (class names), which pipeline attribute
holds the denoiser, which text-encoder slots it has and the prefixes files use for them, how
the family's *original* module tree (LDM/SGM, BFL, SAI) maps onto diffusers' tree (a function
generating ``{original path: Target}`` from the model's own structure), which name prefixes
files use for diffusers-tree names, and the words that give a file of the family away.

A :data:`Target` is a diffusers module path, or a :class:`Split`: one original module whose
ΔW rows are several diffusers modules' ΔW stacked (fused q/k/v, FLUX's ``linear1`` = q, k, v
and the MLP input), optionally with its two halves swapped (adaLN modulation ordered
(shift, scale) in the original tree, (scale, shift) in diffusers' ``AdaLayerNormContinuous``).
ΔW's rows are the rows of ``P = w1_a ⊙_row w2_a``, so slicing (or permuting) the rows of
``hada_w1_a`` and ``hada_w2_a`` gives exact LoHas on the pieces.

Families: :data:`SD` (SD 1.x/2.x), :data:`SDXL` (both in :mod:`.stable_diffusion`),
:data:`FLUX` (:mod:`.flux`) and :data:`SD3` (:mod:`.sd3`). A new family is one more entry in
:data:`FAMILIES` (plus tests); nothing else changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Union

import torch.nn as nn

if TYPE_CHECKING:
    import torch

__all__ = [
    "Split",
    "Target",
    "TextEncoderSlot",
    "Family",
    "FAMILIES",
    "family_by_name",
    "family_of_model",
    "family_of_pipeline",
    "guess_file_family",
    "module_names",
    "text_encoder_names",
    "CLIP_TEXT_MODEL_LEVEL",
]


@dataclass(frozen=True)
class Split:
    """One file module that is several model modules stacked by rows.

    Attributes:
        pieces: ``(module path, rows)`` in the file's row order; the rows add up to the fused width.
        swap_halves: The file orders the two halves of the rows the other way round (applied
            before the split; with one piece it is a pure permutation).
    """

    pieces: tuple[tuple[str, int], ...]
    swap_halves: bool = False

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.pieces)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.pieces)


Target = Union[str, Split]


@dataclass(frozen=True)
class TextEncoderSlot:
    """A pipeline's text encoder as files name it.

    Attributes:
        attribute: Pipeline attribute (``text_encoder``, ``text_encoder_2``, …).
        kohya_prefixes: kohya prefixes files use, the one lohakit writes first.
        diffusers_prefixes: Dotted prefixes of diffusers-style files (``text_encoder.``).
        comfy_prefixes: ComfyUI's generic ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` prefixes.
    """

    attribute: str
    kohya_prefixes: tuple[str, ...]
    diffusers_prefixes: tuple[str, ...] = ()
    comfy_prefixes: tuple[str, ...] = ()

    @property
    def save_prefix(self) -> str:
        return self.kohya_prefixes[0]


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring).

    Attributes:
        name: Short id (``"flux"``).
        label: Human name for messages (``"FLUX.1"``).
        model_classes: Class names of the denoiser in diffusers.
        component: Pipeline attribute holding the denoiser (``unet`` / ``transformer``).
        text_encoders: The pipeline's text encoders in order.
        original_names: ``model -> {original-tree path: Target}``, generated from the model's structure.
        diffusers_prefixes: Dotted prefixes of diffusers-tree names (``"transformer."``, ``""`` = bare).
        flat_prefixes: Prefixes of ``_``-joined diffusers-tree names (``"lora_unet_"``, ``"lycoris_"``, …).
        save_style: How lohakit writes the denoiser: ``"kohya"`` (``lora_unet_`` + diffusers path),
            ``"original"`` (``lora_unet_`` + original path, where one module maps to one), or a
            flat prefix such as ``"lora_transformer_"`` (diffusers path).
        file_words: Regex (searched in file module names) that only this family's files match.
        base_model_version: ``ss_base_model_version`` written into saved files.
        matches: Extra test on a model of one of ``model_classes`` (SD vs SDXL share the UNet class).
        processor_aliases: Also accept the old attention-processor names (``attn1.processor.to_q``).
        conv_words: Regex on file module names that may be convolutions (kernel unknown from a file).
    """

    name: str
    label: str
    model_classes: tuple[str, ...]
    component: str
    text_encoders: tuple[TextEncoderSlot, ...]
    original_names: Callable[[nn.Module], dict[str, Target]]
    diffusers_prefixes: tuple[str, ...]
    flat_prefixes: tuple[str, ...]
    save_style: str
    file_words: str
    base_model_version: str
    matches: Callable[[nn.Module], bool] = field(default=lambda m: True)
    processor_aliases: bool = False
    conv_words: str = r"(?!x)x"

    def slot_for(self, prefix: str) -> TextEncoderSlot | None:
        """The text-encoder slot a kohya prefix (``lora_te1``) or attribute name belongs to."""
        for slot in self.text_encoders:
            if prefix in slot.kohya_prefixes or prefix == slot.attribute:
                return slot
        return None


#: transformers 5 dropped CLIPTextModel's ``text_model`` level; files (and ComfyUI, A1111) keep it.
CLIP_TEXT_MODEL_LEVEL = "text_model."
_CLIP_TREE = re.compile(r"^(embeddings|encoder\.layers|final_layer_norm)(\.|$)")


def _flat(path: str) -> str:
    return path.replace(".", "_")


def text_encoder_names(slot: TextEncoderSlot | None, prefix: str, path: str) -> list[str]:
    """Every name a text-encoder module is known by in files.

    CLIP paths without the ``text_model`` level (transformers 5) answer to the names with it too
    (that is what files hold); ``prefix`` is the kohya prefix the caller uses for this model.
    """
    paths = [path]
    if _CLIP_TREE.match(path):
        paths.insert(0, CLIP_TEXT_MODEL_LEVEL + path)
    elif path.startswith(CLIP_TEXT_MODEL_LEVEL):
        paths.append(path[len(CLIP_TEXT_MODEL_LEVEL):])
    kohya = [prefix] + (list(slot.kohya_prefixes) if slot else [])
    names: list[str] = []
    for p in paths:
        names += [f"{k}_{_flat(p)}" for k in dict.fromkeys(kohya)]
        if slot:
            names += [f"{d}{p}" for d in slot.diffusers_prefixes]
            names += [f"{c}{p}" for c in slot.comfy_prefixes]
    return list(dict.fromkeys(names))


def text_encoder_save_path(path: str) -> str:
    """The path a text-encoder module is written under: CLIP trees always with ``text_model``."""
    return CLIP_TEXT_MODEL_LEVEL + path if _CLIP_TREE.match(path) else path


_PROCESSOR = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")


def module_names(family: Family, model: nn.Module, paths: Iterable[str]) -> dict[str, list[Target]]:
    """Every file module name the denoiser of ``family`` answers to.

    Args:
        family: The family.
        model: The denoiser (unwrapped).
        paths: Its adaptable module paths.

    Returns:
        name -> targets (more than one distinct target means the name is ambiguous).
    """
    paths = list(paths)
    have = set(paths)
    table: dict[str, list[Target]] = {}

    def add(name: str, target: Target) -> None:
        hits = table.setdefault(name, [])
        if target not in hits:
            hits.append(target)

    for orig, target in family.original_names(model).items():
        needed = target.paths if isinstance(target, Split) else (target,)
        if not all(p in have for p in needed):
            continue
        for name in (f"lora_unet_{_flat(orig)}", f"diffusion_model.{orig}", orig):
            add(name, target)
    for path in paths:
        for pre in family.flat_prefixes:
            add(f"{pre}{_flat(path)}", path)
        for pre in family.diffusers_prefixes:
            add(f"{pre}{path}", path)
            if family.processor_aliases and _PROCESSOR.search(path):
                old = _PROCESSOR.sub(lambda m: ".processor." + m.group(1).replace(".0", ""), path)
                add(f"{pre}{old}", path)
    return table


def save_names(family: Family, model: nn.Module, paths: Iterable[str]) -> dict[str, str]:
    """``{module path: name}`` lohakit writes the denoiser's modules under (one module each, never fused)."""
    paths = list(paths)
    if family.save_style == "original":
        back = {t: o for o, t in family.original_names(model).items() if isinstance(t, str)}
        return {p: f"lora_unet_{_flat(back[p])}" if p in back else f"lora_unet_{_flat(p)}" for p in paths}
    if family.save_style == "kohya":
        return {p: f"lora_unet_{_flat(p)}" for p in paths}
    return {p: f"{family.save_style}{_flat(p)}" for p in paths}


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------
def _families() -> tuple[Family, ...]:
    return FAMILIES


def family_by_name(name: str) -> Family:
    """The family with this id (``sd``, ``sdxl``, ``flux``, ``sd3``)."""
    for f in _families():
        if f.name == name:
            return f
    raise KeyError(f"unknown model family {name!r}; known: {[f.name for f in _families()]}")


def family_of_model(model: nn.Module) -> Family | None:
    """The family whose denoiser class ``model`` (or a LoHaModel's wrapped model) is; None if none."""
    inner = getattr(model, "model", None)
    if type(model).__name__ == "LoHaModel" and isinstance(inner, nn.Module):
        model = inner
    cls = type(model).__name__
    for f in _families():
        if cls in f.model_classes and f.matches(model):
            return f
    return None


def family_of_pipeline(pipe: object) -> Family | None:
    """The family of a pipeline-like object (by its ``unet`` / ``transformer`` attribute), or None."""
    for attr in ("transformer", "unet"):
        m = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return family_of_model(m)
    return None


_UNET_WORDS = re.compile(r"input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks")


def guess_file_family(names: Iterable[str]) -> tuple[Family | None, dict[str, list[str]]]:
    """Which family a file's module names give away.

    Returns:
        (the family or None when nothing tells, {family name: a few names showing it}); more
        than one entry in the dict means the file mixes families.
    """
    names = list(names)
    evidence: dict[str, list[str]] = {}
    for f in _families():
        hits = [n for n in names if re.search(f.file_words, n)]
        if hits:
            evidence[f.name] = hits[:3]
    if "sdxl" in evidence and not any(_UNET_WORDS.search(n) or re.search(r"label_emb|add_embedding", n) for n in names):
        del evidence["sdxl"]  # lora_te2_ / CLIP-G alone is SDXL's, SD3's or FLUX's T5: only a UNet tells SDXL
    if "sdxl" not in evidence and not ({"flux", "sd3"} & set(evidence)):
        unet = [n for n in names if _UNET_WORDS.search(n)]
        if unet:
            evidence["sd"] = unet[:3]
    if len(evidence) == 1:
        return family_by_name(next(iter(evidence))), evidence
    return None, evidence


def describe_rows(split: Split) -> str:
    """``to_q (16) + to_k (16) + …`` for messages."""
    return " + ".join(f"{p} ({r})" for p, r in split.pieces)


def split_rows(split: Split, w: torch.Tensor) -> list[torch.Tensor]:
    """The row blocks of a tensor for each piece (after the half swap when the split asks for it)."""
    import torch

    if split.swap_halves:
        h = w.shape[0] // 2
        w = torch.cat([w[h:], w[:h]], dim=0)
    out, start = [], 0
    for _, r in split.pieces:
        out.append(w[start:start + r])
        start += r
    return out


def out_rows(model: nn.Module, path: str) -> int:
    """Output rows of the module at ``path`` (its weight's first dimension)."""
    m = model.get_submodule(path)
    m = getattr(m, "base_layer", m)
    return int(m.weight.shape[0])


def fused(model: nn.Module, paths: Iterable[str], swap_halves: bool = False) -> Split | None:
    """A :class:`Split` over ``paths`` with row counts read from the model; None if one is missing."""
    pieces = []
    for p in paths:
        try:
            pieces.append((p, out_rows(model, p)))
        except AttributeError:
            return None
    return Split(tuple(pieces), swap_halves)


def swapped_if_continuous(model: nn.Module, path: str) -> Target | None:
    """``path`` itself, or a half-swapping :class:`Split` when its parent is diffusers'
    ``AdaLayerNormContinuous`` (which orders the modulation (scale, shift); original trees order
    it (shift, scale)); None when the module does not exist."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return None
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    if type(parent).__name__ in _SWAPPED_NORMS:
        return fused(model, [path], swap_halves=True)
    return path


#: diffusers norms whose modulation halves are in the other order than the original trees'.
_SWAPPED_NORMS = ("AdaLayerNormContinuous",)


def block_names(
    model: nn.Module,
    blocks: Mapping[tuple[str, str], Mapping[str, Union[str, tuple[str, ...]]]],
    singles: Mapping[str, str],
) -> dict[str, Target]:
    """Original-tree names from a block table (the shared shape of the DiT families).

    Args:
        model: The diffusers model.
        blocks: ``(diffusers block list, original block list) -> {original child: diffusers
            child or tuple of children stacked by rows}``; applied to every index of the list.
        singles: ``original path -> diffusers path`` outside the repeated blocks.

    Returns:
        original path -> Target, for the modules the model has (modulation halves swapped where
        diffusers uses ``AdaLayerNormContinuous``).
    """
    out: dict[str, Target] = {}

    def put(orig: str, target: Union[str, tuple[str, ...]]) -> None:
        if isinstance(target, tuple):
            t = fused(model, target)
        else:
            t = swapped_if_continuous(model, target)
        if t is not None:
            out[orig] = t

    for (dlist, olist), children in blocks.items():
        container = getattr(model, dlist, None)
        for i in range(len(container) if container is not None else 0):
            for ochild, dchild in children.items():
                if isinstance(dchild, tuple):
                    put(f"{olist}.{i}.{ochild}", tuple(f"{dlist}.{i}.{c}" for c in dchild))
                else:
                    put(f"{olist}.{i}.{ochild}", f"{dlist}.{i}.{dchild}")
    for orig, d in singles.items():
        put(orig, d)
    return out


# The registry (at the end: the family modules use the classes above). SDXL before SD: same UNet
# class, SDXL's test is the specific one. A new family is one more module and one more entry here.
from .flux import FLUX  # noqa: E402
from .sd3 import SD3  # noqa: E402
from .stable_diffusion import SD, SDXL  # noqa: E402

#: Every known family, in recognition order.
FAMILIES: tuple[Family, ...] = (SDXL, SD, FLUX, SD3)
