"""Tiny random models of every supported family (transformers' test sizes), for `adainfer doctor` and the tests.

One factory: `adainfer doctor` compares what our shims and architecture specs compute with what the stock code
computes on these models, and the test suite builds its stock / AdaInfer pairs from the same configs. Stock classes
only; nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = [
    "PERTURBED_VARIANTS",
    "VARIANTS",
    "VOCAB",
    "WINDOW",
    "gemma3_config",
    "ids",
    "llama_config",
    "mistral_config",
    "opt_config",
    "qwen2_config",
    "qwen3_config",
    "stock_model",
]

VOCAB = 99
WINDOW = 4  # sliding window of the sliding-window families: a 9-token batch runs past it


def _rope_like(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, max_position_embeddings=128)
    kw.update(overrides)
    return kw


def llama_config(**overrides) -> LlamaConfig:
    """Llama with grouped-query attention (4 heads, 2 KV heads), 4 layers."""
    return LlamaConfig(**_rope_like(**overrides))


def opt_config(**overrides) -> OPTConfig:
    """OPT (pre-LN unless `do_layer_norm_before=False`; `word_embed_proj_dim=16` adds `project_in/out`)."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=37, num_hidden_layers=4, num_attention_heads=4,
              word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=1, dropout=0.0,
              attention_dropout=0.0)
    kw.update(overrides)
    return OPTConfig(**kw)


def qwen2_config(**overrides) -> Qwen2Config:
    """Qwen2 (biased q/k/v projections); `use_sliding_window=True` makes layers >= `max_window_layers` local."""
    return Qwen2Config(**_rope_like(**overrides))


def qwen3_config(**overrides) -> Qwen3Config:
    """Qwen3 (`q_norm` / `k_norm`)."""
    return Qwen3Config(**_rope_like(**{"head_dim": 8, **overrides}))


def mistral_config(**overrides) -> MistralConfig:
    """Mistral with a sliding window of `WINDOW`."""
    return MistralConfig(**_rope_like(**{"sliding_window": WINDOW, **overrides}))


def gemma3_config(**overrides) -> Gemma3TextConfig:
    """Gemma3 text with local/global layers (two rotary tables), a window of `WINDOW`, `(1 + w)` norms and final
    logit softcapping; `layer_types` alternate local/global over `num_hidden_layers` unless given."""
    layers = overrides.get("num_hidden_layers", 4)
    kw = _rope_like(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, final_logit_softcapping=3.0,
                    layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


# name -> (stock class, config factory); the layouts the package supports.
VARIANTS = {
    "llama_gqa": (LlamaForCausalLM, llama_config),
    "llama_tied": (LlamaForCausalLM, lambda **kw: llama_config(**{"tie_word_embeddings": True,
                                                                  "num_key_value_heads": 4, **kw})),
    "opt_pre_ln": (OPTForCausalLM, lambda **kw: opt_config(**{"do_layer_norm_before": True, **kw})),
    "opt_post_ln": (OPTForCausalLM, lambda **kw: opt_config(**{"do_layer_norm_before": False, **kw})),
    "opt_350m_layout": (OPTForCausalLM, lambda **kw: opt_config(**{"do_layer_norm_before": False,
                                                                   "word_embed_proj_dim": 16, **kw})),
    "qwen2_bias": (Qwen2ForCausalLM, qwen2_config),
    "qwen2_sliding": (Qwen2ForCausalLM, lambda **kw: qwen2_config(**{
        "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2, **kw})),
    "qwen3": (Qwen3ForCausalLM, qwen3_config),
    "mistral_sliding": (MistralForCausalLM, mistral_config),
    "gemma3_text": (Gemma3ForCausalLM, gemma3_config),
}
# Stock init leaves biases at 0 and norm weights at 1 (Gemma: 0 in `1 + w`), which would hide a missing bias or a
# wrong norm: these variants' 1-D parameters are perturbed off their init.
PERTURBED_VARIANTS = ("qwen2_bias", "qwen2_sliding", "qwen3", "mistral_sliding", "gemma3_text")


def stock_model(variant: str, seed: int = 0, attn: str = "sdpa", **overrides):
    """A seeded stock model of `variant` (a key of `VARIANTS`) in eval mode, fp32.

    Args:
        variant (`str`): the layout, e.g. `"llama_gqa"`, `"opt_350m_layout"`, `"gemma3_text"`.
        seed (`int`, *optional*, defaults to 0): the weights' seed.
        attn (`str`, *optional*, defaults to `"sdpa"`): the attention implementation.
        overrides: config fields (e.g. `num_hidden_layers=3`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}; got {variant!r}.")
    model_cls, make_config = VARIANTS[variant]
    torch.manual_seed(seed)
    config = make_config(**overrides)
    config._attn_implementation = attn
    model = model_cls(config).eval()
    if variant in PERTURBED_VARIANTS:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(0.1 * torch.randn_like(param))
    return model


def ids(length: int = 7, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Seeded token ids [batch, length] in the tiny vocabulary (ids 0-2 are left to special tokens)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
