"""adainfer-hf: drop-in early-exit (AdaInfer) model classes for Hugging Face transformers."""

from .classifier import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
    ExitClassifier,
    ExitClassifierConfig,
)
from .exact_cache import CACHE_MODES, ExactExitCache
from .features import DEFAULT_FEATURES, FEATURES
from .modeling import AdaInferCausalLMOutput, AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM
from .policy import ExitPolicy, ScriptedExit
from .rules import GapThresholdRule
from .schedule import choose_schedule, measure_check_cost
from .stats import ExitStatistics

__all__ = [
    "AdaInferCausalLMOutput",
    "AdaInferLlamaForCausalLM",
    "AdaInferOPTForCausalLM",
    "CACHE_MODES",
    "CLASSIFIER_CONFIG_NAME",
    "CLASSIFIER_SAFE_NAME",
    "CLASSIFIER_WEIGHTS_NAME",
    "DEFAULT_FEATURES",
    "ExactExitCache",
    "ExitClassifier",
    "ExitClassifierConfig",
    "ExitPolicy",
    "ExitStatistics",
    "FEATURES",
    "GapThresholdRule",
    "ScriptedExit",
    "choose_schedule",
    "measure_check_cost",
]
