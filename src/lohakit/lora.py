"""``lohakit.lora`` (public path): re-exports :mod:`lohakit.integrations.lora`."""

from .integrations.lora import *  # noqa: F401,F403
from .integrations.lora import __all__  # noqa: F401
