"""`AdaInferMistralForCausalLM`: transformers' `MistralForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferMistralForCausalLM", "AdaInferMistralDecoderLayer"]


class AdaInferMistralDecoderLayer(ExitLayerMixin, MistralDecoderLayer):
    """`MistralDecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferMistralForCausalLM(AdaInferMixin, MistralForCausalLM):
    """`MistralForCausalLM` with AdaInfer early exit. Loads any stock Mistral checkpoint (`sliding_window` attention).
    """

    _adainfer_layer_class = AdaInferMistralDecoderLayer
    _no_split_modules = ["MistralDecoderLayer", "AdaInferMistralDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
