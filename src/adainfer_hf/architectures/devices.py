"""Where modules compute, also when accelerate dispatched or offloaded them (family-independent)."""

from __future__ import annotations

import torch
from torch import nn

from .. import compat

__all__ = ["execution_device", "execution_dtype", "materialized_weight"]


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its weights' device, or accelerate's execution device when offloaded."""
    device = compat.offload_execution_device(module)
    return device if device is not None else next(module.parameters()).device


def execution_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in (its weight's, also when offloaded)."""
    return materialized_weight(module).dtype


def materialized_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight`, read from accelerate's offload map when it sits on the meta device."""
    weight = module.weight
    if weight.device.type == "meta":
        weights_map = compat.offload_weights_map(module)
        if weights_map is not None:
            return weights_map["weight"]
    return weight
