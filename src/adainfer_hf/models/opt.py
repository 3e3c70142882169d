"""`AdaInferOPTForCausalLM`: transformers' `OPTForCausalLM` with AdaInfer early exit."""

from __future__ import annotations

from transformers import OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from .modeling import AdaInferMixin, ExitLayerMixin

__all__ = ["AdaInferOPTForCausalLM", "AdaInferOPTDecoderLayer"]


class AdaInferOPTDecoderLayer(ExitLayerMixin, OPTDecoderLayer):
    """`OPTDecoderLayer` that can be skipped or run on a subset of rows by the exit loop."""


class AdaInferOPTForCausalLM(AdaInferMixin, OPTForCausalLM):
    """`OPTForCausalLM` with AdaInfer early exit. Loads any stock OPT checkpoint (pre- and post-LN, `project_out`).
    """

    _adainfer_layer_class = AdaInferOPTDecoderLayer
    _no_split_modules = ["OPTDecoderLayer", "AdaInferOPTDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self._adainfer_setup()
