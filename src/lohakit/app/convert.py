"""``lohakit convert``: PEFT directory ↔ kohya/LyCORIS file, and LoHa → LoRA export.

A thin front end over :mod:`lohakit.formats.kohya` and :mod:`lohakit.lora` (imported lazily):

| IN          | --to   | OUT                 | needs                                  |
|-------------|--------|---------------------|----------------------------------------|
| PEFT dir    | kohya  | .safetensors        | ``--prefix`` (default ``lora_unet``)   |
| kohya file  | peft   | directory           | ``--base`` (kohya names are lossy)     |
| PEFT dir    | lora   | directory or .safetensors (kohya LoRA) | ``--base`` optional (conv kernels) |
| kohya file  | lora   | .safetensors (kohya LoRA) |                                  |

The exact LoRA has rank r1·r2 (ΔW = s·P Q, BRIEF §4); ``--rank K`` compresses it (QR of the
factors + SVD of a small core) and the report gives the worst relative error.
"""

from __future__ import annotations

import os
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


def load_any_model(model_dir: str | os.PathLike) -> Any:
    """A transformers model directory, or a diffusers component directory (config with ``_class_name``)."""
    import json

    d = Path(model_dir)
    if not d.exists():
        raise FileNotFoundError(f"base model directory {str(d)!r} does not exist")
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
    """A PEFT LoHa directory as a kohya-style state dict with placeholder names (no dots) and their paths."""
    from ..core.config import LoHaConfig
    from ..core.io import load_state_dict
    from ..core.targets import rank_and_alpha

    import torch

    config = LoHaConfig.from_json_file(src / "adapter_config.json")
    sd = load_state_dict(src / "adapter_model.safetensors")
    paths = sorted({k[len(_PEFT_PREFIX):].rpartition(".")[0] for k in sd if k.startswith(_PEFT_PREFIX) and ".hada_" in k})
    names = {p: f"m{i}" for i, p in enumerate(paths)}
    out: dict[str, Any] = {}
    for k, t in sd.items():
        if not k.startswith(_PEFT_PREFIX):
            continue
        path, _, param = k[len(_PEFT_PREFIX):].rpartition(".")
        if path in names:
            out[f"{names[path]}.{param}"] = t
    for p, n in names.items():
        out[f"{n}.alpha"] = torch.tensor(float(rank_and_alpha(config, p)[1]))
    return out, {n: p for p, n in names.items()}


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    rank: int | None = None,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
    prefix: str = "lora_unet",
) -> str:
    """Convert ``src`` to format ``to`` ("peft", "kohya" or "lora") at ``dst``; return a one-line report."""
    if to not in ("peft", "kohya", "lora"):
        raise ValueError(f"--to must be peft, kohya or lora, got {to!r}")
    if rank is not None and (to != "lora" or rank < 1):
        raise ValueError("--rank is for --to lora and must be >= 1")
    s, d = Path(src), Path(dst)
    kind = _kind(s)
    if d.exists() and (d.is_file() or any(d.iterdir())) and not overwrite:
        raise FileExistsError(f"output {str(d)!r} already exists; pass --overwrite to replace it")
    try:
        from ..formats import kohya as kohya_fmt
    except ImportError as e:
        raise ImportError(f"lohakit convert needs lohakit.formats.kohya, which cannot be imported ({e})") from None

    if to == "kohya":
        if kind != "peft":
            raise ValueError(f"--to kohya converts a PEFT adapter directory; {str(s)!r} already is a kohya file")
        if d.suffix.lower() != ".safetensors":
            raise ValueError(f"--to kohya writes a single .safetensors file; OUT {str(d)!r} must end with .safetensors")
        model = load_any_model(base) if base else None
        kohya_fmt.peft_to_kohya(s, d, prefix=prefix, model=model)
        return f"wrote kohya LoHa file {d} (prefix {prefix})"
    if to == "peft":
        if kind != "kohya":
            raise ValueError(f"--to peft converts a kohya .safetensors file; {str(s)!r} already is a PEFT directory")
        if base is None:
            raise ValueError("--to peft needs --base MODEL_DIR: kohya module names are matched against the model's modules")
        model = load_any_model(base)
        config, report = kohya_fmt.kohya_to_peft(s, model, d, prefix=prefix, base_model_name_or_path=str(base))
        return f"wrote PEFT LoHa directory {d}: {len(report.matched)} modules, r={config.r}, alpha={config.alpha:g}" + (
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

        exports = lora_mod.to_lora(load_state_dict(s), rank=rank)
        lora_mod.save_lora_kohya(d, {"": exports})
    else:
        if base is not None:
            from ..core.model import LoHaModel

            exports = lora_mod.to_lora(LoHaModel.from_pretrained(load_any_model(base), str(s)), rank=rank)
        else:
            sd, back = _peft_dir_as_state_dict(s)
            exports = {back[k]: v for k, v in lora_mod.to_lora(sd, rank=rank).items()}
        if to_file:
            lora_mod.save_lora_kohya(d, {prefix: exports})
        else:
            lora_mod.save_lora_peft(exports, d, base_model_name_or_path=str(base) if base else None)
    ranks = sorted({e.rank for e in exports.values()})
    worst = max(e.rel_error for e in exports.values())
    how = "exact" if rank is None else f"compressed to rank {rank}, worst relative error {worst:.3e}"
    return f"wrote LoRA ({'kohya file' if to_file else 'PEFT directory'}) {d}: {len(exports)} modules, rank {ranks}, {how}"
