"""The tiny random models (transformers' test sizes) the contract checks of `adainfer_hf.doctor` compare against.

Stock classes only: each check runs the stock code and compares what our shims and architecture specs compute.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = ["gemma3", "ids", "llama", "opt", "qwen2", "qwen3"]

_VOCAB = 61


def llama(layers: int = 3, **overrides) -> LlamaForCausalLM:
    """A seeded tiny Llama with grouped-query attention (eager attention)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    kw.update(overrides)
    config = LlamaConfig(**kw)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def opt(layers: int = 3, **overrides) -> OPTForCausalLM:
    """A seeded tiny OPT in the OPT-350m layout (post-LN, `project_out`) unless overridden."""
    torch.manual_seed(0)
    kw = dict(vocab_size=_VOCAB, hidden_size=32, ffn_dim=37, num_hidden_layers=layers, num_attention_heads=4,
              word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=1, dropout=0.0,
              attention_dropout=0.0, do_layer_norm_before=False)
    kw.update(overrides)
    config = OPTConfig(**kw)
    config._attn_implementation = "eager"
    return OPTForCausalLM(config).eval()


def _family(config_cls, model_cls, layers: int = 3, **overrides):
    """A tiny Llama-layout family model whose 1-D parameters (biases, norm weights) are perturbed off their
    init (zero biases and unit / zero norm weights would hide a missing bias or a wrong norm)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    kw.update(overrides)
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def qwen2(layers: int = 3, **overrides) -> Qwen2ForCausalLM:
    """Qwen2 with q/k/v biases; its last layers attend within a window of 4."""
    kw = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    kw.update(overrides)
    return _family(Qwen2Config, Qwen2ForCausalLM, layers, **kw)


def qwen3(layers: int = 3, **overrides) -> Qwen3ForCausalLM:
    """Qwen3 (`q_norm` / `k_norm`)."""
    return _family(Qwen3Config, Qwen3ForCausalLM, layers, head_dim=8, **overrides)


def gemma3(layers: int = 3, **overrides) -> Gemma3ForCausalLM:
    """Gemma3 text: local/global layers (two rotary tables), k_norm, `(1 + w)` norms, final logit softcap."""
    kw = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=3.0,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers])
    kw.update(overrides)
    return _family(Gemma3TextConfig, Gemma3ForCausalLM, layers, **kw)


def ids(length: int = 7, batch: int = 2) -> torch.Tensor:
    """Seeded token ids [batch, length] in the tiny vocabulary."""
    return torch.randint(3, _VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
