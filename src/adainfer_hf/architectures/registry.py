"""`spec_for(model_or_config)`: the `ArchitectureSpec` of a model family, by `config.model_type`."""

from __future__ import annotations

from .base import ArchitectureSpec
from .gemma3 import Gemma3Spec
from .llama import LlamaSpec
from .mistral import MistralSpec
from .opt import OPTSpec
from .qwen import Qwen2Spec, Qwen3Spec

__all__ = ["SPECS", "SUPPORTED_MODEL_TYPES", "spec_for"]

SPECS: dict[str, ArchitectureSpec] = {
    t: spec for spec in (LlamaSpec(), OPTSpec(), Qwen2Spec(), Qwen3Spec(), MistralSpec(), Gemma3Spec())
    for t in spec.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(SPECS)


def spec_for(model_or_config) -> ArchitectureSpec:
    """The spec of a model (or config) by its `model_type`; `NotImplementedError` naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is None:
        raise NotImplementedError(
            f"adainfer_hf supports model types {SUPPORTED_MODEL_TYPES}; got model_type={model_type!r}.")
    return spec
