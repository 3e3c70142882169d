"""adainfer-hf: drop-in early-exit (AdaInfer) model classes for Hugging Face transformers."""

from .artifact.config import ExitClassifierConfig
from .cache.exact import CACHE_MODES, ExactExitCache
from .cache.propagate import PropagateExitCache
from .data.prompts import build_prompts, load_task
from .estimators.rules import AlwaysExit, GapThresholdRule
from .evaluation.evaluate import evaluate
from .models.auto import AutoAdaInferForCausalLM
from .models.default_model import DEFAULT_MODEL_NAME, default_model_dir
from .models.gemma3 import AdaInferGemma3ForCausalLM
from .models.llama import AdaInferLlamaForCausalLM
from .models.loading import load_adainfer_model
from .models.mistral import AdaInferMistralForCausalLM
from .models.modeling import AdaInferCausalLMOutput
from .models.opt import AdaInferOPTForCausalLM
from .models.qwen2 import AdaInferQwen2ForCausalLM
from .models.qwen3 import AdaInferQwen3ForCausalLM
from .policy.base import ExitPolicy, ScriptedExit
from .policy.classifier import ExitClassifier
from .runtime.recording import ExitRecorder, ExitStatistics
from .training.calibrate import calibrate
from .training.config import (
    CalibrationConfig,
    DraftingConfig,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from .training.train import train_and_calibrate

__all__ = [
    "CACHE_MODES",
    "AlwaysExit",
    "DEFAULT_MODEL_NAME",
    "AdaInferCausalLMOutput",
    "AdaInferGemma3ForCausalLM",
    "AdaInferLlamaForCausalLM",
    "AdaInferMistralForCausalLM",
    "AdaInferOPTForCausalLM",
    "AdaInferQwen2ForCausalLM",
    "AdaInferQwen3ForCausalLM",
    "AutoAdaInferForCausalLM",
    "CalibrationConfig",
    "DraftingConfig",
    "ExactExitCache",
    "ExitClassifier",
    "ExitClassifierConfig",
    "ExitPolicy",
    "ExitRecorder",
    "ExitStatistics",
    "GapThresholdRule",
    "GateConfig",
    "GenerationCalibrationConfig",
    "PropagateExitCache",
    "ScheduleConfig",
    "ScriptedExit",
    "TrainingConfig",
    "build_prompts",
    "calibrate",
    "default_model_dir",
    "evaluate",
    "load_adainfer_model",
    "load_task",
    "train_and_calibrate",
]
