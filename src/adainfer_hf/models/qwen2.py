"""`AdaInferQwen2ForCausalLM`: transformers' `Qwen2ForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferQwen2ForCausalLM", "AdaInferQwen2DecoderLayer"]


class AdaInferQwen2DecoderLayer(ExitLayerMixin, Qwen2DecoderLayer):
    """`Qwen2DecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferQwen2ForCausalLM(AdaInferMixin, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with AdaInfer early exit. Loads any stock Qwen2 / Qwen2.5 checkpoint (q/k/v biases; sliding-window layers with `use_sliding_window`).
    """

    _adainfer_layer_class = AdaInferQwen2DecoderLayer
    _no_split_modules = ["Qwen2DecoderLayer", "AdaInferQwen2DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
