"""``lohakit merge``: bake a LoHa adapter into a transformers model and write the merged directory.

W ← W + s·(w1a w1b) ⊙ (w2a w2b) for every adapted module (computed in float32, cast once to W's
dtype), then ``save_pretrained(max_shard_size=...)``: safetensors shards plus an index, exactly
as transformers writes them, so ``AutoModel.from_pretrained(OUT)`` loads the merged model. The
directory is written next to OUT and renamed into place: a failure leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["merge_to_dir", "load_transformers_model"]

#: Files copied from the base directory so the merged directory is self-contained.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "added_tokens.json", "chat_template.jinja",
)


def load_transformers_model(model_dir: str | os.PathLike) -> Any:
    """Load a model directory with the class named in its config (``architectures[0]``), else AutoModel."""
    from .train import _model_dir_checks

    cfg = _model_dir_checks(Path(model_dir))
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a transformers model directory needs transformers: pip install 'lohakit[cli]'") from e

    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model directory {str(model_dir)!r} cannot be loaded: {str(e).splitlines()[0]}") from None


def merge_to_dir(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``adapter`` (PEFT LoHa directory) into ``base`` and write a transformers directory at ``out``.

    Returns:
        ``{"out", "merged_modules", "files"}`` (files: safetensors weight files written).

    Raises:
        FileExistsError: ``out`` exists and is not empty, and ``overwrite`` is False.
        FileNotFoundError / ValueError: a missing or unusable base or adapter.
    """
    from ..core.model import LoHaModel

    out_p, adapter_p = Path(out), Path(adapter)
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {str(out_p)!r} already exists; pass --overwrite to replace it")
    if not adapter_p.exists():
        raise FileNotFoundError(f"adapter {str(adapter_p)!r} does not exist")
    if adapter_p.is_file():
        kind = "a kohya/LyCORIS single-file adapter" if adapter_p.suffix == ".safetensors" else "a file"
        raise ValueError(
            f"adapter {str(adapter_p)!r} is {kind}, not a PEFT adapter directory; convert it first: "
            f"lohakit convert {adapter_p} ADAPTER_DIR --to peft --base {base}"
        )
    if not (adapter_p / "adapter_config.json").is_file():
        raise ValueError(f"adapter {str(adapter_p)!r} is not a PEFT adapter directory (no adapter_config.json)")
    if not Path(base).exists():
        raise FileNotFoundError(f"base model directory {str(base)!r} does not exist")
    model = load_transformers_model(base)
    peft = LoHaModel.from_pretrained(model, str(adapter_p))
    n = len(list(peft.loha_layers()))
    merged = peft.merge_and_unload(safe_merge=True)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.", dir=out_p.parent))
    try:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        for name in _SIDE_FILES:
            src = Path(base) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        (tmp / "lohakit_merge.json").write_text(
            json.dumps({"base": str(base), "adapter": str(adapter_p), "merged_modules": n}, indent=2), encoding="utf-8"
        )
        files = sorted(p.name for p in tmp.glob("*.safetensors"))
        if out_p.exists():
            old = out_p.with_name(f".{out_p.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out_p, old)
            os.replace(tmp, out_p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out_p), "merged_modules": n, "files": len(files)}
