"""adainfer-hf: drop-in early-exit (AdaInfer) model classes for Hugging Face transformers."""

from .cache.exact import CACHE_MODES, ExactExitCache
from .cache.propagate import PropagateExitCache
from .data.prompts import build_prompts, load_task
from .estimators.rules import GapThresholdRule
from .evaluation.evaluate import evaluate
from .evaluation.shortgpt import block_influence, shortgpt_model
from .models.auto import AutoAdaInferForCausalLM
from .models.default_model import DEFAULT_MODEL_NAME, default_model_dir
from .models.gemma3 import AdaInferGemma3ForCausalLM
from .models.llama import AdaInferLlamaForCausalLM
from .models.mistral import AdaInferMistralForCausalLM
from .models.modeling import AdaInferCausalLMOutput
from .models.opt import AdaInferOPTForCausalLM
from .models.qwen2 import AdaInferQwen2ForCausalLM
from .models.qwen3 import AdaInferQwen3ForCausalLM
from .policy.base import ExitPolicy, ScriptedExit
from .policy.classifier import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
    ExitClassifier,
    ExitClassifierConfig,
)
from .policy.features import DEFAULT_FEATURES, FEATURES
from .runtime.recording import ExitStatistics
from .training.calibrate import calibrate, simulate_exits
from .training.collect import FeatureTable, collect_features, load_adainfer_model
from .training.check_cost import measure_check_cost
from .training.schedule import choose_schedule, schedule_classifier
from .training.train import train_and_calibrate, train_exit_classifier

__all__ = [
    "AdaInferCausalLMOutput",
    "AdaInferGemma3ForCausalLM",
    "AdaInferLlamaForCausalLM",
    "AdaInferMistralForCausalLM",
    "AdaInferOPTForCausalLM",
    "AdaInferQwen2ForCausalLM",
    "AdaInferQwen3ForCausalLM",
    "AutoAdaInferForCausalLM",
    "CACHE_MODES",
    "CLASSIFIER_CONFIG_NAME",
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
