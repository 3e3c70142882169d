"""What the rest of the package imports from `architectures`: the registry, the exit head, the K/V fill.

The rest of the package is architecture-free. It reaches a family through the spec bound to the model once
(`model.exit_head.spec`, or `registry.spec_for` for a stock model), the logit lens through `ExitHead`
(`head.py`) and the fill of skipped layers through `KVFill` (`kv_fill.py`).
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureSpec
from .copies import weight_call
from .devices import execution_device, execution_dtype, materialized_weight
from .head import ExitHead, fingerprints_match, head_of
from .kv_fill import KVFill, kv_fill_of
from .registry import SPECS, SUPPORTED_MODEL_TYPES, spec_for

__all__ = [
    "SPECS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureSpec",
    "ExitHead",
    "KVFill",
    "execution_device",
    "execution_dtype",
    "fingerprints_match",
    "head_of",
    "kv_fill_of",
    "materialized_weight",
    "spec_for",
    "weight_call",
    "spec_of",
]


def spec_of(model: nn.Module) -> ArchitectureSpec:
    """The family spec of `model`: the one its exit head bound at setup, or the registry's (a stock model)."""
    head = getattr(model, "exit_head", None)
    return head.spec if isinstance(head, ExitHead) else spec_for(model)
