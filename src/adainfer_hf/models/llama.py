"""`AdaInferLlamaForCausalLM`: transformers' `LlamaForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferLlamaForCausalLM", "AdaInferLlamaDecoderLayer"]


class AdaInferLlamaDecoderLayer(ExitLayerMixin, LlamaDecoderLayer):
    """`LlamaDecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferLlamaForCausalLM(AdaInferMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` with AdaInfer early exit. Loads any stock Llama checkpoint (SmolLM2 included).

    Example:
    ```python
    >>> model = AdaInferLlamaForCausalLM.from_pretrained(path, exit_classifier=clf_dir)
    >>> out = model(**tok(prompts, return_tensors="pt", padding=True))
    >>> out.logits, out.exit_layers
    ```
    """

    _adainfer_layer_class = AdaInferLlamaDecoderLayer
    _no_split_modules = ["LlamaDecoderLayer", "AdaInferLlamaDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
