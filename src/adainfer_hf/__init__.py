"""adainfer-hf: drop-in early-exit (AdaInfer) model classes for Hugging Face transformers."""

from .calibrate import calibrate, simulate_exits
from .classifier import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
    ExitClassifier,
    ExitClassifierConfig,
)
from .collect import FeatureTable, collect_features, load_adainfer_model
from .data import build_prompts, load_task
from .default_model import DEFAULT_MODEL_NAME, default_model_dir
from .evaluate import evaluate
from .exact_cache import CACHE_MODES, ExactExitCache
from .features import DEFAULT_FEATURES, FEATURES
from .modeling import AdaInferCausalLMOutput, AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM
from .policy import ExitPolicy, ScriptedExit
from .propagate_cache import PropagateExitCache
from .rules import GapThresholdRule
from .schedule import choose_schedule, measure_check_cost, schedule_classifier
from .shortgpt import block_influence, shortgpt_model
from .stats import ExitStatistics
from .train import train_and_calibrate, train_exit_classifier

__all__ = [
    "AdaInferCausalLMOutput",
    "AdaInferLlamaForCausalLM",
    "AdaInferOPTForCausalLM",
    "CACHE_MODES",
    "CLASSIFIER_CONFIG_NAME",
    "CLASSIFIER_MANIFEST_NAME",
    "CLASSIFIER_SAFE_NAME",
    "CLASSIFIER_WEIGHTS_NAME",
    "DEFAULT_FEATURES",
    "DEFAULT_MODEL_NAME",
    "ExactExitCache",
    "PropagateExitCache",
    "ExitClassifier",
    "ExitClassifierConfig",
    "ExitPolicy",
    "ExitStatistics",
    "FEATURES",
    "FeatureTable",
    "GapThresholdRule",
    "ScriptedExit",
    "block_influence",
    "build_prompts",
    "calibrate",
    "choose_schedule",
    "collect_features",
    "default_model_dir",
    "evaluate",
    "load_adainfer_model",
    "load_task",
    "measure_check_cost",
    "schedule_classifier",
    "shortgpt_model",
    "simulate_exits",
    "train_and_calibrate",
    "train_exit_classifier",
]
