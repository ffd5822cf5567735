"""A LoHaModel under torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), CPU (gloo) or GPU.

The LoHa factors are ordinary float32 ``nn.Parameter`` s, so FSDP2 shards them with the frozen
base weights of the same block (FSDP2 keeps ``requires_grad`` per parameter; no
``use_orig_params`` switch is needed as with FSDP1). What FSDP changes for lohakit is saving:
sharded parameters are ``DTensor`` s, of which each rank holds a slice, so the adapter is
gathered into full tensors first (a collective: every rank calls) and written by rank 0 in
PEFT's directory format, the same bytes an unsharded ``save_pretrained`` writes.

Example (under ``torchrun`` or ``accelerate launch``)::

    model = get_peft_model(llama, LoHaConfig(target_modules=["q_proj", "v_proj"]))
    shard_loha_model(model)                     # each decoder layer, then the root
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ...
    save_pretrained_sharded(model, "out/")      # every rank; rank 0 writes
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.layers import LoHaLayer
from ..core.model import LoHaModel
from ..formats import peft as peft_format

__all__ = ["full_tensor", "shard_loha_model", "adapter_full_state_dict", "save_pretrained_sharded", "sharded_blocks"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective over its mesh); any other tensor as is."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: the classes transformers names in ``_no_split_modules``
    (decoder layers), else the entries of every ``nn.ModuleList`` with more than one entry."""
    base = model.get_base_model() if isinstance(model, LoHaModel) else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [child for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 for child in m]
    return blocks


def shard_loha_model(model: LoHaModel, blocks: Iterable[nn.Module] | None = None, **fully_shard_kwargs: Any) -> LoHaModel:
    """Apply ``fully_shard`` to each block, then to the whole LoHaModel (in place); returns it.

    Call it after the adapters are created (and loaded), before building the optimizer, with a
    process group initialised (``torchrun``, ``accelerate launch``).

    Args:
        model: The LoHaModel.
        blocks: Modules to shard separately (default: :func:`sharded_blocks`).
        **fully_shard_kwargs: Passed to ``fully_shard`` (``mesh``, ``reshard_after_forward``, ...).

    Raises:
        RuntimeError: No process group is initialised.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_loha_model needs an initialised process group (run under torchrun or accelerate launch)")
    for block in list(sharded_blocks(model) if blocks is None else blocks):
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def adapter_full_state_dict(model: LoHaModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys, gathered into full float32 CPU tensors.

    A collective when the model is sharded: every rank must call it (in the same order).
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.loha_layers():
        for name in LoHaLayer.adapter_layer_names:
            params = getattr(layer, name)
            if adapter_name in params:
                t = full_tensor(params[adapter_name].detach())
                out[f"{peft_format.KEY_PREFIX}{path}.{name}"] = t.to("cpu", torch.float32).contiguous()
    for path, wrapper in model._wrappers():
        if adapter_name in wrapper.modules_to_save:
            for k, t in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{peft_format.KEY_PREFIX}{path}.{k}"] = full_tensor(t.detach()).to("cpu").contiguous()
    return out


def save_pretrained_sharded(
    model: LoHaModel, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
    is_main_process: bool | None = None,
) -> None:
    """``save_pretrained`` for a sharded (or unsharded) LoHaModel: gather, then rank 0 writes.

    Every rank must call it. The files are PEFT's directory layout, written atomically as by
    :meth:`LoHaModel.save_pretrained`, and equal to what the unsharded model writes.

    Args:
        model: The LoHaModel (after :func:`shard_loha_model`, or not sharded at all).
        save_directory: Target directory; a non-default adapter goes to its subfolder.
        selected_adapters: Adapters to save (default: all).
        is_main_process: Who writes (default: rank 0, or True without a process group).
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} do not exist; available: {sorted(model.peft_config)}")
    gathered = [(n, adapter_full_state_dict(model, n)) for n in names]  # collective: on every rank
    if is_main_process is None:
        is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if is_main_process:
        root = os.fspath(save_directory)
        payloads = [
            (root if n == "default" else os.path.join(root, n), peft_format._config_json(model, n), tensors)
            for n, tensors in gathered
        ]
        peft_format.write_adapter_dirs(payloads)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
