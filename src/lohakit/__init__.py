"""lohakit: LoHa (Low-Rank Hadamard product) adapters for PyTorch models.

Layout: ``config`` (LoHaConfig), ``functional`` (all the math), ``layers`` (nn.Module
wrappers), ``targets`` (which modules to adapt), ``model`` (injection and adapter lifecycle).
"""

from .config import LoHaConfig
from .functional import HadaFactors, Geometry, delta_weight
from .layers import LoHaLayer
from .model import LoHaModel, ModulesToSaveWrapper, get_peft_model
from .io import LoHaFormatError, load_state_dict, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
    "ModulesToSaveWrapper",
    "get_peft_model",
    "HadaFactors",
    "Geometry",
    "delta_weight",
    "LoHaFormatError",
    "load_state_dict",
    "save_state_dict",
    "__version__",
]
