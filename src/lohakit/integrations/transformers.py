"""transformers' ``Trainer`` and TRL's ``SFTTrainer`` with a :class:`~lohakit.LoHaModel`.

Why a subclass: ``Trainer`` recognises adapter models only by ``isinstance(model, peft.PeftModel)``
(and full models by ``isinstance(model, PreTrainedModel)``). Any other model is treated as an
opaque ``nn.Module``: its forward signature (read to drop unused dataset columns) is the
wrapper's ``(*args, **kwargs)``, its checkpoints are the whole ``state_dict()`` written with
safetensors (the base model included, and refused outright when embeddings are tied), and a
resume expects that file back. There is no hook, callback or attribute through which a model
can change these decisions (``on_save`` runs after the failing write), so the four methods
concerned are overridden here and nothing else:

- ``_set_signature_columns_if_needed``: the wrapped model's ``forward`` signature (as Trainer
  does for a PEFT model), so the default ``remove_unused_columns=True`` works;
- ``_save``: the adapter in PEFT's directory format (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable by ``LoHaModel.from_pretrained`` and
  ``peft.PeftModel.from_pretrained``), plus what Trainer writes next to a model (processing
  class, ``training_args.bin``); used by checkpoints, ``save_model`` and ``push_to_hub``;
- ``_load_from_checkpoint`` / ``_load_best_model``: the checkpoint's adapter copied into the
  live adapter in place (the optimizer keeps its parameters), after checking keys and shapes.

For any other model the classes behave exactly like the ones they extend.

Example:
    >>> from lohakit import LoHaConfig, get_peft_model
    >>> from lohakit.integrations.transformers import LoHaTrainer
    >>> model = get_peft_model(llama, LoHaConfig(target_modules=["q_proj", "v_proj"]))
    >>> LoHaTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds).train()
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer

from ..core.config import LoHaConfig, is_peft_loha_config
from ..core.io import load_state_dict
from ..core.model import LoHaModel, get_peft_model
from ..formats.peft import ADAPTER_CONFIG_NAME, KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME

logger = logging.getLogger(__name__)

# LoHaSFTTrainer is built on first access (module __getattr__), since trl is optional.
__all__ = ["LoHaTrainer", "LoHaTrainerMixin", "load_adapter_weights", "unwrap_loha_model"]

TRAINING_ARGS_NAME = "training_args.bin"


def unwrap_loha_model(model: Any) -> LoHaModel | None:
    """The LoHaModel inside DDP / DataParallel / ``torch.compile`` wrappers, or None."""
    seen = 0
    while seen < 8:
        if isinstance(model, LoHaModel):
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model, seen = inner, seen + 1
    return None


def _live_tensors(model: LoHaModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT file key -> the live tensor it is saved from (parameters, not copies)."""
    return {f"{KEY_PREFIX}{k}": t for k, t in model.adapter_state_dict(adapter_name, keep_vars=True).items()}


def load_adapter_weights(model: LoHaModel, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy a saved adapter's tensors into ``model``'s existing adapter ``adapter_name``, in place.

    Unlike :meth:`LoHaModel.load_adapter`, which adds a new adapter, this overwrites the values
    of one that exists (same modules, same shapes), keeping the parameter objects: an optimizer
    built on them stays valid. Everything is checked before the first copy.

    Raises:
        FileNotFoundError: ``directory`` has no ``adapter_model.safetensors``.
        ValueError: The file's keys or shapes differ from the live adapter (named in the message).
    """
    weights = os.path.join(os.fspath(directory), SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{directory}: no {SAFETENSORS_WEIGHTS_NAME} (not a LoHa adapter checkpoint)")
    tensors = load_state_dict(weights)
    live = _live_tensors(model, adapter_name)
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"{weights}: does not fit adapter {adapter_name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [k for k, t in tensors.items() if tuple(t.shape) != tuple(live[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{weights}: {k} has shape {tuple(tensors[k].shape)}, the adapter has {tuple(live[k].shape)}")
    with torch.no_grad():
        for k, t in tensors.items():
            live[k].copy_(t.to(device=live[k].device, dtype=live[k].dtype))


class LoHaTrainerMixin:
    """The Trainer overrides for LoHa models (see the module docstring); mix in before the Trainer class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loha = self._loha_model()
        if loha is not None:
            # Trainer reads these from the model's class; for a PEFT model from the base model's.
            from transformers.utils import can_return_loss, find_labels

            base = loha.get_base_model()
            if self.args.label_names is None:
                self.label_names = find_labels(type(base))
            self.can_return_loss = can_return_loss(type(base))
            if hasattr(self, "_loss_shifts_labels"):
                from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

                self._loss_shifts_labels = LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss and not getattr(
                    getattr(base, "config", None), "is_encoder_decoder", False
                )

    def _loha_model(self) -> LoHaModel | None:
        return unwrap_loha_model(getattr(self, "model", None))

    def _set_signature_columns_if_needed(self) -> None:
        model = self._loha_model()
        if model is None or getattr(self, "_signature_columns", None) is not None:
            return super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns = list(inspect.signature(model.get_base_model().forward).parameters)
        self._signature_columns = columns + sorted({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._loha_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the LoHa adapter to %s", output_dir)
        model.save_pretrained(output_dir)
        processor = self.processing_class
        if processor is None:
            processor = getattr(getattr(self, "data_collator", None), "tokenizer", None)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        loha = unwrap_loha_model(model if model is not None else self.model)
        if loha is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)  # type: ignore[misc]
        self._load_adapters(loha, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        loha = self._loha_model()
        if loha is None:
            return super()._load_best_model()  # type: ignore[misc]
        logger.info("Loading the best adapter from %s", self.state.best_model_checkpoint)
        self._load_adapters(loha, self.state.best_model_checkpoint)

    @staticmethod
    def _load_adapters(loha: LoHaModel, directory: str) -> None:
        if not os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
            raise ValueError(
                f"{directory}: no {ADAPTER_CONFIG_NAME}; this checkpoint was not written by a LoHa trainer "
                "(lohakit.integrations.transformers.LoHaTrainer)"
            )
        for name in loha.peft_config:
            where = directory if name == "default" else os.path.join(directory, name)
            if os.path.isfile(os.path.join(where, SAFETENSORS_WEIGHTS_NAME)):
                load_adapter_weights(loha, where, name)


class LoHaTrainer(LoHaTrainerMixin, Trainer):
    """transformers' ``Trainer`` that filters columns, saves and resumes a LoHaModel as its adapter.

    Takes exactly ``Trainer``'s arguments; any other model trains as with ``Trainer``.
    """


_SFT_TRAINER: type | None = None


def _sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with the LoHa overrides (built on first use: trl is optional)."""
    global _SFT_TRAINER
    if _SFT_TRAINER is not None:
        return _SFT_TRAINER
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError("LoHaSFTTrainer needs TRL: pip install trl") from e

    class LoHaSFTTrainer(LoHaTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` for LoHa models (the overrides of :class:`LoHaTrainerMixin`).

        ``peft_config`` may be a lohakit or PEFT ``LoHaConfig``: the model (an ``nn.Module``) is
        wrapped with lohakit's ``get_peft_model`` before TRL sees it (TRL would give the config
        to PEFT). Every other argument is ``SFTTrainer``'s.
        """

        def __init__(self, model: Any = None, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            if peft_config is not None and (isinstance(peft_config, LoHaConfig) or is_peft_loha_config(peft_config)):
                if not isinstance(model, nn.Module):
                    raise ValueError("LoHaSFTTrainer with a LoHaConfig needs the model as an nn.Module (load it first)")
                if not isinstance(model, LoHaModel):
                    model = get_peft_model(model, peft_config)
                peft_config = None
            super().__init__(model, *args, peft_config=peft_config, **kwargs)
            self._move_fused_head_to_base()

        def _move_fused_head_to_base(self) -> None:
            """TRL patches the model's ``forward`` with a fused LM head that calls ``self.base_model``
            as a transformers backbone. For a PEFT model it patches ``get_base_model()`` instead;
            do the same for a LoHaModel (whose ``base_model`` means what it means in PEFT)."""
            loha = self._loha_model()
            if loha is None or "forward" not in vars(loha):
                return
            del loha.forward  # the instance attribute TRL set; LoHaModel.forward passes everything on
            from trl.trainer import sft_trainer

            patch = getattr(sft_trainer, "add_fused_lm_head", None)
            if patch is not None:
                patch(loha.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))

    LoHaSFTTrainer.__module__ = __name__
    _SFT_TRAINER = LoHaSFTTrainer
    return LoHaSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "LoHaSFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
