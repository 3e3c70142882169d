"""`AdaInferQwen3ForCausalLM`: transformers' `Qwen3ForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferQwen3ForCausalLM", "AdaInferQwen3DecoderLayer"]


class AdaInferQwen3DecoderLayer(ExitLayerMixin, Qwen3DecoderLayer):
    """`Qwen3DecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferQwen3ForCausalLM(AdaInferMixin, Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with AdaInfer early exit. Loads any stock Qwen3 dense checkpoint (`q_norm` / `k_norm`).
    """

    _adainfer_layer_class = AdaInferQwen3DecoderLayer
    _no_split_modules = ["Qwen3DecoderLayer", "AdaInferQwen3DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
