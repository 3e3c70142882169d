"""Model classes: one module per family (`llama`, `opt`, `qwen2`, `qwen3`, `mistral`, `gemma3`), the shared
early-exit mixin (`modeling`), the auto class (`auto`), the classifier saved beside a checkpoint (`beside`) and the
embedded default model (`default_model`)."""
