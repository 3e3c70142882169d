"""`AutoAdaInferForCausalLM`: the AdaInfer class of a checkpoint, picked from its `config.model_type`."""

from __future__ import annotations

import os

from transformers import AutoConfig

from .gemma3 import AdaInferGemma3ForCausalLM
from .llama import AdaInferLlamaForCausalLM
from .mistral import AdaInferMistralForCausalLM
from .opt import AdaInferOPTForCausalLM
from .qwen2 import AdaInferQwen2ForCausalLM
from .qwen3 import AdaInferQwen3ForCausalLM

__all__ = ["ADAINFER_CLASSES", "AutoAdaInferForCausalLM"]

ADAINFER_CLASSES: dict[str, type] = {
    "llama": AdaInferLlamaForCausalLM,
    "opt": AdaInferOPTForCausalLM,
    "qwen2": AdaInferQwen2ForCausalLM,
    "qwen3": AdaInferQwen3ForCausalLM,
    "mistral": AdaInferMistralForCausalLM,
    "gemma3_text": AdaInferGemma3ForCausalLM,
}
"""`config.model_type` -> the AdaInfer causal-LM class that loads it."""

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
