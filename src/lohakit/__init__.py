"""lohakit: LoHa (Low-Rank Hadamard product) adapters for PyTorch models.

Layout (arrows point one way, down): ``app`` (the ``lohakit`` command) → ``integrations``
(diffusers, LoRA export) → ``formats`` (PEFT directories, kohya files, per-family name tables)
→ ``core`` (the engine: config, functional math, kernels, layers, targets, model, io).
"""

from .core.config import LoHaConfig
from .core.functional import HadaFactors, Geometry, delta_weight
from .core.layers import LoHaLayer
from .core.model import LoHaModel, ModulesToSaveWrapper, get_peft_model, inject_adapter_in_model
from .core.io import (
    AdapterChangedError, LoHaFormatError, ResourceLimitError, UnreadableFileError, load_state_dict, save_state_dict,
)
from .formats import peft as _peft_format  # noqa: F401  registers PEFT's directory format as the adapter store
from .integrations import diffusers as _diffusers  # noqa: F401  guards diffusers pipeline saves (no diffusers import)

__version__ = "0.1.0"

__all__ = [
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
    "ModulesToSaveWrapper",
    "get_peft_model",
    "inject_adapter_in_model",
    "HadaFactors",
    "Geometry",
    "delta_weight",
    "LoHaFormatError",
    "UnreadableFileError",
    "ResourceLimitError",
    "AdapterChangedError",
    "load_state_dict",
    "save_state_dict",
    "__version__",
]
