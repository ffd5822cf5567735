"""``lohakit.kohya``: the kohya/LyCORIS single-file format (implemented in :mod:`lohakit.formats.kohya`)."""

from .formats.kohya import *  # noqa: F401,F403
from .formats.kohya import __all__  # noqa: F401
