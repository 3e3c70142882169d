"""Everything adainfer_hf knows about specific model families (the only place that does)."""

from .core import *  # noqa: F403
from .core import __all__  # noqa: F401
