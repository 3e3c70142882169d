"""What the rest of the package imports from `architectures`: the registry, the exit head, the K/V fill.

The rest of the package is architecture-free. It reaches a family through the spec bound to the model once
(`model.exit_head.spec`, or `registry.spec_for` for a stock model), the logit lens through `ExitHead`
(`head.py`) and the fill of skipped layers through `KVFill` (`kv_fill.py`).
"""

from __future__ import annotations

import torch
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
    # used by runtime/cache until the merge (each dispatches to the model's spec, head or K/V fill):
    "decoder_layers",
    "exit_head_device",
    "exit_logits",
    "fill_position_embeddings",
    "head_width",
    "kv_device",
    "kv_weights_resident",
    "layer_index",
    "layer_kv_states",
    "layer_sublayers",
    "layer_type",
    "num_layers",
    "position_embeddings",
    "sliding_window",
    "stacked_kv_states",
    "sublayer_output",
]


def _spec(model: nn.Module) -> ArchitectureSpec:
    head = getattr(model, "exit_head", None)
    return head.spec if isinstance(head, ExitHead) else spec_for(model)


# ---------------------------------------------------------------------- used by runtime/cache until the merge
def decoder_layers(model: nn.Module) -> nn.ModuleList:  # used by runtime/cache until the merge
    return _spec(model).decoder_layers(model)


def num_layers(model: nn.Module) -> int:  # used by runtime/cache until the merge
    return _spec(model).num_layers(model)


def layer_index(model: nn.Module, layer: nn.Module) -> int:  # used by runtime/cache until the merge
    return _spec(model).layer_index(layer)


def kv_weights_resident(model: nn.Module, layer: nn.Module) -> bool:  # used by runtime/cache until the merge
    return all(p.weight.device.type != "meta" for p in _spec(model).kv_projections(layer))


def kv_device(model: nn.Module, layer: nn.Module) -> torch.device:  # used by runtime/cache until the merge
    return _spec(model).kv_projections(layer)[0].weight.device


def layer_type(model: nn.Module, layer_idx: int) -> str:  # used by runtime/cache until the merge
    return _spec(model).layer_type(model, layer_idx)


def sliding_window(model: nn.Module, layer_idx: int) -> int | None:  # used by runtime/cache until the merge
    return _spec(model).sliding_window(model, layer_idx)


def exit_logits(model: nn.Module, hidden: torch.Tensor, dtype: torch.dtype | None = None,
                vocabulary: torch.Tensor | None = None) -> torch.Tensor:  # used by runtime/cache until the merge
    return head_of(model).logits(hidden, dtype, vocabulary)


def head_width(model: nn.Module) -> int:  # used by runtime/cache until the merge
    return head_of(model).width


def exit_head_device(model: nn.Module) -> torch.device:  # used by runtime/cache until the merge
    return _spec(model).exit_head_device(model)


def layer_sublayers(model: nn.Module, layer: nn.Module):  # used by runtime/cache until the merge
    return _spec(model).sublayers(layer)


def sublayer_output(model: nn.Module, output: torch.Tensor, n_rows: int):  # used by runtime/cache until the merge
    return _spec(model).sublayer_output(output, n_rows)


def layer_kv_states(model: nn.Module, layer: nn.Module, hidden: torch.Tensor,
                    position_embeddings=None):  # used by runtime/cache until the merge
    return _spec(model).layer_kv_states(model, layer, hidden, position_embeddings)


def fill_position_embeddings(model: nn.Module, hidden: torch.Tensor,
                             layer_kwargs: dict):  # used by runtime/cache until the merge
    return _spec(model).fill_position_embeddings(model, hidden, layer_kwargs)


def stacked_kv_states(model: nn.Module, hidden: torch.Tensor, first: int,
                      position_embeddings=None):  # used by runtime/cache until the merge
    return kv_fill_of(model).stacked(hidden, first, position_embeddings)


def position_embeddings(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                        layer: nn.Module | None = None):  # used by runtime/cache until the merge
    return _spec(model).position_embeddings(model, hidden, position_ids, layer)
