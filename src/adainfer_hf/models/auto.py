"""`AutoAdaInferForCausalLM`: the AdaInfer class of a checkpoint, picked from its `config.model_type`."""

from __future__ import annotations

import os

from transformers import AutoConfig

from ..architectures.registry import SUPPORTED_MODEL_TYPES
from .gemma3 import AdaInferGemma3ForCausalLM
from .llama import AdaInferLlamaForCausalLM
from .mistral import AdaInferMistralForCausalLM
from .opt import AdaInferOPTForCausalLM
from .qwen2 import AdaInferQwen2ForCausalLM
from .qwen3 import AdaInferQwen3ForCausalLM

__all__ = ["ADAINFER_CLASSES", "AutoAdaInferForCausalLM"]

_FAMILY_CLASSES = (AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM, AdaInferQwen2ForCausalLM,
                   AdaInferQwen3ForCausalLM, AdaInferMistralForCausalLM, AdaInferGemma3ForCausalLM)
_BY_TYPE = {cls.config_class.model_type: cls for cls in _FAMILY_CLASSES}
if set(_BY_TYPE) != set(SUPPORTED_MODEL_TYPES):  # the one family registry is `architectures.registry`
    raise ImportError(f"AdaInfer classes exist for {sorted(_BY_TYPE)} but architectures.registry supports "
                      f"{sorted(SUPPORTED_MODEL_TYPES)}; every family needs both a spec and a class.")
ADAINFER_CLASSES: dict[str, type] = {t: _BY_TYPE[t] for t in SUPPORTED_MODEL_TYPES}
"""`config.model_type` -> the AdaInfer causal-LM class that loads it (keys: `architectures.SUPPORTED_MODEL_TYPES`,
in the registry's order; each class's type is its stock class's `config_class.model_type`)."""

_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only")


class AutoAdaInferForCausalLM:
    """Loads any supported checkpoint with its AdaInfer class (like `AutoModelForCausalLM`; not instantiable).

    Example:
    ```python
    >>> model = AutoAdaInferForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", exit_classifier=clf_dir)
    ```
    """

    def __init__(self, *args, **kwargs):
        raise OSError("AutoAdaInferForCausalLM is a factory: use AutoAdaInferForCausalLM.from_pretrained(...) "
                      "or AutoAdaInferForCausalLM.class_for(config).")

    @staticmethod
    def class_for(config) -> type:
        """The AdaInfer class of `config` (a `PretrainedConfig`); `NotImplementedError` listing the supported
        model types otherwise."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ADAINFER_CLASSES:
            raise NotImplementedError(
                f"model_type={model_type!r} has no AdaInfer class; supported model types: "
                f"{sorted(ADAINFER_CLASSES)}.")
        return ADAINFER_CLASSES[model_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs):
        """Reads the checkpoint's config and calls `from_pretrained` of its AdaInfer class.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): local directory or Hub id.
            kwargs: everything the AdaInfer classes' `from_pretrained` take (`exit_classifier`, `dtype`,
                `device_map`, `revision`, ...).
        """
        config = kwargs.get("config")
        if config is None:
            config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        return cls.class_for(config).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
