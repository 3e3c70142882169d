"""`AdaInferGemma3ForCausalLM`: transformers' `Gemma3ForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferGemma3ForCausalLM", "AdaInferGemma3DecoderLayer"]


class AdaInferGemma3DecoderLayer(ExitLayerMixin, Gemma3DecoderLayer):
    """`Gemma3DecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferGemma3ForCausalLM(AdaInferMixin, Gemma3ForCausalLM):
    """`Gemma3ForCausalLM` with AdaInfer early exit. Loads text-only Gemma3 checkpoints (`model_type="gemma3_text"`, e.g. gemma-3-270m, gemma-3-1b): local/global layers, softcapping.
    """

    _adainfer_layer_class = AdaInferGemma3DecoderLayer
    _no_split_modules = ["Gemma3DecoderLayer", "AdaInferGemma3DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
