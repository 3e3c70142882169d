"""Loading a checkpoint as its AdaInfer class: `load_adainfer_model`, the one call the CLI, evaluation and examples
use (a directory, a Hub id, or `"default"` for the embedded model)."""

from __future__ import annotations

import os

from .auto import AutoAdaInferForCausalLM
from .default_model import default_model_dir

__all__ = ["load_adainfer_model"]


def load_adainfer_model(name_or_path: str | os.PathLike, **kwargs):
    """Loads a checkpoint with the AdaInfer class of its `model_type` (`AutoAdaInferForCausalLM`).

    Args:
        name_or_path (`str` or `os.PathLike`): a local directory, a Hub id, or `"default"` for the embedded
            SmolLM2-135M-Instruct (`default_model.default_model_dir()`).
        kwargs: passed to `from_pretrained` (`dtype`, `revision`, `exit_classifier`, ...).

    Returns:
        The AdaInfer model (`AdaInferLlamaForCausalLM`, `AdaInferQwen2ForCausalLM`, ...), in eval mode.

    Raises:
        `NotImplementedError`: the checkpoint's `model_type` is not one of `models.auto.ADAINFER_CLASSES`.
    """
    if os.fspath(name_or_path) == "default":
        name_or_path = default_model_dir()
    return AutoAdaInferForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
