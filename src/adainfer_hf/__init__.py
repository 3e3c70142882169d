"""adainfer-hf: drop-in early-exit (AdaInfer) model classes for Hugging Face transformers."""

from .features import DEFAULT_FEATURES, FEATURES
from .modeling import AdaInferCausalLMOutput, AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM
from .policy import ExitPolicy, ScriptedExit

__all__ = [
    "AdaInferCausalLMOutput",
    "AdaInferLlamaForCausalLM",
    "AdaInferOPTForCausalLM",
    "DEFAULT_FEATURES",
    "ExitPolicy",
    "FEATURES",
    "ScriptedExit",
]
