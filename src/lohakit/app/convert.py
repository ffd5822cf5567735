"""``lohakit convert``: PEFT directory ↔ kohya/LyCORIS file, and LoHa → LoRA export.

A thin front end over :mod:`lohakit.formats.kohya` and :mod:`lohakit.lora` (imported lazily):

| IN          | --to   | OUT                 | needs                                  |
|-------------|--------|---------------------|----------------------------------------|
| PEFT dir    | kohya  | .safetensors        | ``--prefix`` for a language model (diffusion models: ``lora_unet``) |
| kohya file  | peft   | directory           | ``--base`` (kohya names are lossy)     |
| PEFT dir    | lora   | directory or .safetensors (kohya LoRA) | ``--base`` optional (conv kernels) |
| kohya file  | lora   | .safetensors (kohya LoRA) | ``--base`` when a flat LoHa may sit on a conv |

``--base`` is a transformers model directory, a diffusers model directory or a diffusers
pipeline directory (``model_index.json``: its ``unet``/``transformer`` and text encoders are
loaded, the rest is not). The exact LoRA has rank r1·r2 (ΔW = s·P Q, BRIEF §4); ``--rank K``
compresses the modules whose exact rank is above K (QR of the factors + SVD of a small core)
and the report gives the worst relative error.

Input and output are checked as the loaders check them. IN is read through the loaders'
readers and every module's factors pass :func:`lohakit.app.inspection.check_module_factors`
(shapes, ranks, finite values) before anything is converted; OUT is written to a staged name
next to it (``.OUT.convert-<id>``), read back and checked again (a PEFT LoHa directory against
``--base`` with the PEFT loader's own plan and tensor checks, a kohya LoHa file with the factor
checks, a LoRA with finite, rank-consistent up/down pairs), and only then renamed into place
(a file output is written inside that marked staging directory and renamed out of it; a directory
output is swapped in as ``lohakit merge`` swaps, under the same lock). convert first runs merge's
recovery (:func:`lohakit.app.merge.recover_stagings`), so the ``.OUT.convert-<id>`` a killed
convert left is dropped and an OUT set aside by a crash mid-swap is put back; OUT is resolved as
merge resolves it (symlink target; not ".", a root or a mount point).
A malformed IN or an output a loader would refuse is a :class:`~lohakit.core.io.LoHaFormatError`
(exit 2) and OUT stays as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["convert", "load_any_model"]

_PEFT_PREFIX = "base_model.model."


def _kind(src: Path) -> str:
    if not src.exists():
        raise FileNotFoundError(f"input {str(src)!r} does not exist")
    if src.is_dir():
        if not (src / "adapter_config.json").is_file():
            raise ValueError(f"input directory {str(src)!r} is not a PEFT adapter (no adapter_config.json)")
        return "peft"
    if src.suffix.lower() == ".safetensors":
        return "kohya"
    raise ValueError(f"input {str(src)!r}: expected a PEFT adapter directory or a kohya .safetensors file")


#: pipeline components ``--base PIPELINE_DIR`` loads (the rest of a pipeline has no LoHa modules)
_PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def load_any_model(model_dir: str | os.PathLike) -> Any:
    """A transformers model directory, a diffusers component directory (config with ``_class_name``),
    or a diffusers pipeline directory (``model_index.json``; returns an object with its
    ``unet``/``transformer`` and ``text_encoder*`` components)."""
    import json
    import types

    d = Path(model_dir)
    if not d.exists():
        raise FileNotFoundError(f"base model directory {str(d)!r} does not exist")
    if d.is_dir() and (d / "model_index.json").is_file():
        parts = {c: load_any_model(d / c) for c in _PIPELINE_COMPONENTS if (d / c / "config.json").is_file()}
        if not parts:
            raise ValueError(f"pipeline directory {str(d)!r} has none of {list(_PIPELINE_COMPONENTS)} with a config.json")
        return types.SimpleNamespace(**parts)
    if d.is_dir() and (d / "config.json").is_file():
        try:
            cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from None
        if isinstance(cfg, dict) and "_class_name" in cfg:
            if not any((d / f).is_file() for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")):
                raise ValueError(f"model directory {str(d)!r} has no weights (diffusion_pytorch_model.safetensors)")
            try:
                import diffusers
            except ImportError as e:
                raise ImportError(f"{d} is a diffusers model directory; loading it needs diffusers: pip install diffusers") from e
            cls = getattr(diffusers, cfg["_class_name"], None)
            if cls is None:
                raise ValueError(f"{d / 'config.json'}: diffusers has no class {cfg['_class_name']!r}")
            return cls.from_pretrained(str(d))
    from .merge import load_transformers_model

    return load_transformers_model(d)  # validates the directory (config.json, weights)


def _peft_dir_as_state_dict(src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A PEFT LoHa directory (read and checked as the loaders do) as a kohya-style state dict with
    placeholder names (no dots) and their paths."""
    import torch

    from .inspection import read_loha_modules

    data = read_loha_modules(src, equal_ranks=True)
    names = {p: f"m{i}" for i, p in enumerate(sorted(data["modules"]))}
    out: dict[str, Any] = {}
    for p, n in names.items():
        for param, t in data["modules"][p].items():
            out[f"{n}.{param}"] = t
        out[f"{n}.alpha"] = torch.tensor(float(data["alpha"][p]))
    return out, {n: p for p, n in names.items()}


def _pipeline_or_model(base: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The loaded ``--base`` and its kohya prefixes: a family's denoiser or pipeline gets the
    family's prefixes (lora_unet, lora_te1, …); any other model is returned alone (no prefixes)."""
    import torch.nn as nn

    from ..integrations.diffusers import pipeline_models

    obj = load_any_model(base)
    try:
        models, _, _ = pipeline_models(obj)
    except TypeError:
        if not isinstance(obj, nn.Module):
            raise ValueError(f"--base {str(base)!r}: no unet/transformer of a known family in the pipeline directory") from None
        return obj, {}
    return obj, models


def _model_for_prefix(base: str | os.PathLike, prefix: str | None) -> tuple[Any, str]:
    """The one model of ``--base`` that ``--prefix`` names (default: the denoiser, ``lora_unet``)."""
    obj, models = _pipeline_or_model(base)
    if not models:
        return obj, prefix or "lora_unet"
    prefix = prefix or "lora_unet"
    if prefix in models:
        return models[prefix], prefix
    from ..formats.families import family_of_model

    fam = family_of_model(models["lora_unet"])
    slot = fam.slot_for(prefix) if fam is not None else None
    if slot is not None and slot.save_prefix in models:
        return models[slot.save_prefix], prefix
    raise ValueError(f"--prefix {prefix!r}: --base {str(base)!r} has models for {sorted(models)}")


_DIFFUSION_PATH = re.compile(
    r"(^|\.)(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks|conv_in|conv_out|time_embedding|"
    r"x_embedder|context_embedder|pos_embed|time_text_embed|norm_out)(\.|$)"
)
_TEXT_ENCODER_PATH = re.compile(r"^(text_model\.)?encoder\.(layers\.\d+\.(self_attn|mlp)|block\.\d+\.layer)\.")


def _default_kohya_prefix(paths: list[str], src: Path) -> str:
    """``lora_unet`` for a diffusion model's modules, ``lora_te`` for a CLIP/T5 text encoder's;
    anything else (a language model) is refused: kohya files are for diffusion pipelines."""
    if any(_DIFFUSION_PATH.search(p) for p in paths):
        return "lora_unet"
    if paths and all(_TEXT_ENCODER_PATH.match(p) for p in paths):
        return "lora_te"
    sample = paths[:3]
    raise ValueError(
        f"{src}: modules such as {sample} are not a diffusion model's or text encoder's; kohya files are read by "
        "Stable Diffusion-family tools only. Pass --prefix (lora_unet, lora_te, …) to write one anyway"
    )


def _lora_report(exports: dict[str, Any], rank: int | None, to_file: bool, d: Path) -> str:
    ranks = sorted({e.rank for e in exports.values()})
    full = sorted({e.full_rank for e in exports.values()})
    worst = max(e.rel_error for e in exports.values())
    kind = "kohya file" if to_file else "PEFT directory"
    if rank is None:
        how = "exact"
    else:
        squeezed = [e for e in exports.values() if e.full_rank > rank]
        if not squeezed:
            how = f"exact: --rank {rank} is at or above every module's exact rank {full}, nothing was compressed"
        else:
            how = (
                f"{len(squeezed)} of {len(exports)} modules compressed from exact rank {sorted({e.full_rank for e in squeezed})} "
                f"to rank {rank}, worst relative error {worst:.3e}"
            )
    return f"wrote LoRA ({kind}) {d}: {len(exports)} modules, rank {ranks}, {how}"


def _check_lora_file(path: Path, peft_keys: bool) -> None:
    """A LoRA written by convert: finite up/down pairs of one rank per module (kohya or PEFT keys)."""
    from ..core.io import LoHaFormatError, NonFiniteTensorError, load_state_dict, tensor_is_finite

    sd = load_state_dict(path)
    down, up = ("lora_A.weight", "lora_B.weight") if peft_keys else ("lora_down.weight", "lora_up.weight")
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in sd.items():
        for leaf in (down, up):
            if key.endswith("." + leaf):
                pairs.setdefault(key[: -len(leaf) - 1], {})[leaf] = t
        if not tensor_is_finite(t):
            raise NonFiniteTensorError(f"{path}: {key}: holds NaN or inf")
    if not pairs:
        raise LoHaFormatError(f"{path}: no LoRA ({down} / {up}) tensors were written")
    for mod, pair in pairs.items():
        if set(pair) != {down, up}:
            raise LoHaFormatError(f"{path}: module {mod!r} has only {sorted(pair)}")
        a, b = pair[down], pair[up]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1] or 0 in a.shape or 0 in b.shape:
            raise LoHaFormatError(f"{path}: module {mod!r}: {down} {tuple(a.shape)} and {up} {tuple(b.shape)} do not pair")


def _check_output(staged: Path, to: str, to_file: bool, model: Any) -> None:
    """Read back what convert wrote with the checks its loaders apply (see the module docstring)."""
    if to == "kohya":
        from .inspection import read_loha_modules

        read_loha_modules(staged, equal_ranks=True)
    elif to == "peft":
        from ..formats.peft import check_adapter_tensors, plan_adapter, read_adapter

        source, config, tensors = read_adapter(staged)
        _, slots = plan_adapter(model, config, str(source.config_path))
        check_adapter_tensors(slots, tensors, source.weights_path, source.config_path, strict=True)
    else:
        _check_lora_file(staged if to_file else staged / "adapter_model.safetensors", peft_keys=not to_file)


def _put_in_place(stage: Path, staged: Path, d: Path) -> None:
    """Move the checked output ``staged`` (``stage`` itself, or a file inside it) to ``d``."""
    from ..core.io import _dir_lock
    from .merge import _remove_marked, _swap_into_place

    if staged == stage:
        _swap_into_place(stage, d)
        return
    with _dir_lock(d.parent):
        os.replace(staged, d)
    _remove_marked(stage)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    rank: int | None = None,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
    prefix: str | None = None,
) -> str:
    """Convert ``src`` to format ``to`` ("peft", "kohya" or "lora") at ``dst``; return a one-line report.

    ``prefix`` None: ``lora_unet`` for a diffusion model (``--to kohya`` of a language-model
    adapter then needs it given); with a pipeline ``--base`` it picks the component.
    """
    if to not in ("peft", "kohya", "lora"):
        raise ValueError(f"--to must be peft, kohya or lora, got {to!r}")
    if rank is not None and (to != "lora" or rank < 1):
        raise ValueError("--rank is for --to lora and must be >= 1")
    from .merge import _new_staging, _remove_marked, recover_stagings, resolve_out

    s, given = Path(src), Path(dst)
    kind = _kind(s)
    d = resolve_out(given, "output")  # a symlink's target; not ".", a root or a mount point
    if d.parent.is_dir():
        recover_stagings(d)  # a killed convert's staging; an OUT set aside mid-swap counts as existing
    if d.exists() and (d.is_file() or any(d.iterdir())) and not overwrite:
        raise FileExistsError(f"output {str(given)!r} already exists; pass --overwrite to replace it")
    from ..core.io import LoHaFormatError
    from .inspection import read_loha_modules

    read_loha_modules(s, equal_ranks=True)  # IN checked as the loaders check it, before any work
    d.parent.mkdir(parents=True, exist_ok=True)
    stage = _new_staging(d, "convert")  # marked as ours before anything else is written
    staged = stage / d.name if d.suffix.lower() == ".safetensors" else stage
    checked: dict[str, Any] = {}
    try:
        report = _convert_to(s, staged, given, kind, to, rank, base, prefix, checked)
        try:
            _check_output(staged, to, staged.suffix.lower() == ".safetensors", checked.get("model"))
        except LoHaFormatError as e:
            raise type(e)(
                f"convert wrote output that lohakit's loaders refuse, so {str(given)!r} was left as it was: "
                + str(e).replace(str(staged), str(given))
            ) from None
        _put_in_place(stage, staged, d)
    finally:
        if os.path.lexists(stage):
            _remove_marked(stage)
    return report


def _convert_to(
    s: Path, d: Path, final: Path, kind: str, to: str, rank: int | None, base: Any, prefix: str | None,
    checked: dict[str, Any],
) -> str:
    """Write the conversion at ``d`` (the staged name; ``final`` is what the report names)."""
    try:
        from ..formats import kohya as kohya_fmt
    except ImportError as e:
        raise ImportError(f"lohakit convert needs lohakit.formats.kohya, which cannot be imported ({e})") from None

    if to == "kohya":
        if kind != "peft":
            raise ValueError(f"--to kohya converts a PEFT adapter directory; {str(s)!r} already is a kohya file")
        if final.suffix.lower() != ".safetensors":
            raise ValueError(f"--to kohya writes a single .safetensors file; OUT {str(final)!r} must end with .safetensors")
        if base:
            model, prefix = _model_for_prefix(base, prefix)
        else:
            model = None
            if prefix is None:
                sd, back = _peft_dir_as_state_dict(s)
                prefix = _default_kohya_prefix(sorted(back.values()), s)
        kohya_fmt.peft_to_kohya(s, d, prefix=prefix, model=model)
        return f"wrote kohya LoHa file {final} (prefix {prefix})"
    if to == "peft":
        if kind != "kohya":
            raise ValueError(f"--to peft converts a kohya .safetensors file; {str(s)!r} already is a PEFT directory")
        if base is None:
            raise ValueError("--to peft needs --base MODEL_DIR: kohya module names are matched against the model's modules")
        model, prefix = _model_for_prefix(base, prefix)
        checked["model"] = model
        config, report = kohya_fmt.kohya_to_peft(s, model, d, prefix=prefix, base_model_name_or_path=str(base))
        n_model = len(config.target_modules)
        where = f"{len(report.matched)} modules" if n_model == len(report.matched) else (
            f"{len(report.matched)} file modules on {n_model} model modules (fused blocks split)")
        return f"wrote PEFT LoHa directory {final}: {where}, r={config.r}, alpha={config.alpha:g}" + (
            f"; {len(report.unused_keys)} key(s) of the file unused" if report.unused_keys else ""
        )
    # --to lora
    try:
        from ..integrations import lora as lora_mod
    except ImportError as e:
        raise ImportError(f"lohakit convert --to lora needs lohakit.lora, which cannot be imported ({e})") from None
    to_file = d.suffix.lower() == ".safetensors"
    if kind == "kohya":
        if not to_file:
            raise ValueError("a kohya input exports to a kohya LoRA file: OUT must end with .safetensors")
        from ..core.io import load_state_dict

        models = _pipeline_or_model(base)[1] if base else None
        if base and not models:
            models = {prefix or "lora_unet": load_any_model(base)}
        exports = lora_mod.to_lora(load_state_dict(s), rank=rank, models=models)
        lora_mod.save_lora_kohya(d, {"": exports})
    else:
        if base is not None:
            from ..core.model import LoHaModel

            exports = lora_mod.to_lora(LoHaModel.from_pretrained(load_any_model(base), str(s)), rank=rank)
        else:
            sd, back = _peft_dir_as_state_dict(s)
            exports = {back[k]: v for k, v in lora_mod.to_lora(sd, rank=rank).items()}
        if to_file:
            if prefix is None:
                prefix = _default_kohya_prefix(sorted(exports), s)
            lora_mod.save_lora_kohya(d, {prefix: exports})
        else:
            lora_mod.save_lora_peft(exports, d, base_model_name_or_path=str(base) if base else None)
    return _lora_report(exports, rank, to_file, final)
