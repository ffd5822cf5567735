"""``lohakit.diffusers`` (public path): re-exports :mod:`lohakit.integrations.diffusers`."""

from .integrations.diffusers import *  # noqa: F401,F403
from .integrations.diffusers import __all__  # noqa: F401
