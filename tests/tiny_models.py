"""Tiny random models (transformers' test sizes) shared by the tests: a stock model and its AdaInfer twin."""

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

from adainfer_hf import (
    AdaInferGemma3ForCausalLM,
    AdaInferLlamaForCausalLM,
    AdaInferMistralForCausalLM,
    AdaInferOPTForCausalLM,
    AdaInferQwen2ForCausalLM,
    AdaInferQwen3ForCausalLM,
)

VOCAB = 99


def llama_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, max_position_embeddings=128)
    kw.update(overrides)
    return LlamaConfig(**kw)


def opt_config(**overrides) -> OPTConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=37, num_hidden_layers=4, num_attention_heads=4,
              word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=1, dropout=0.0,
              attention_dropout=0.0)
    kw.update(overrides)
    return OPTConfig(**kw)


WINDOW = 4  # sliding window of the tiny sliding-window families: `batch()`'s 9 tokens run past it


def _rope_like(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, max_position_embeddings=128)
    kw.update(overrides)
    return kw


def qwen2_config(**overrides) -> Qwen2Config:
    """Qwen2 (biased q/k/v projections); `use_sliding_window=True` makes layers >= `max_window_layers` local."""
    return Qwen2Config(**_rope_like(**overrides))


def qwen3_config(**overrides) -> Qwen3Config:
    return Qwen3Config(**_rope_like(head_dim=8, **overrides))


def mistral_config(**overrides) -> MistralConfig:
    return MistralConfig(**_rope_like(sliding_window=WINDOW, **overrides))


def gemma3_config(**overrides) -> Gemma3TextConfig:
    """Gemma3 text with local/global layers (two rotary tables), a window of 4 and final logit softcapping."""
    kw = _rope_like(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, final_logit_softcapping=3.0,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


# name -> (stock class, adainfer class, config factory); covers the layouts the issue names.
VARIANTS = {
    "llama_gqa": (LlamaForCausalLM, AdaInferLlamaForCausalLM, lambda: llama_config()),
    "llama_tied": (LlamaForCausalLM, AdaInferLlamaForCausalLM,
                   lambda: llama_config(tie_word_embeddings=True, num_key_value_heads=4)),
    "opt_pre_ln": (OPTForCausalLM, AdaInferOPTForCausalLM, lambda: opt_config(do_layer_norm_before=True)),
    "opt_post_ln": (OPTForCausalLM, AdaInferOPTForCausalLM, lambda: opt_config(do_layer_norm_before=False)),
    "opt_350m_layout": (OPTForCausalLM, AdaInferOPTForCausalLM,
                        lambda: opt_config(do_layer_norm_before=False, word_embed_proj_dim=16)),
    "qwen2_bias": (Qwen2ForCausalLM, AdaInferQwen2ForCausalLM, lambda: qwen2_config()),
    "qwen2_sliding": (Qwen2ForCausalLM, AdaInferQwen2ForCausalLM,
                      lambda: qwen2_config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": (Qwen3ForCausalLM, AdaInferQwen3ForCausalLM, lambda: qwen3_config()),
    "mistral_sliding": (MistralForCausalLM, AdaInferMistralForCausalLM, lambda: mistral_config()),
    "gemma3_text": (Gemma3ForCausalLM, AdaInferGemma3ForCausalLM, lambda: gemma3_config()),
}
NEW_FAMILIES = ("qwen2_bias", "qwen2_sliding", "qwen3", "mistral_sliding", "gemma3_text")


def make_pair(variant: str, seed: int = 0, attn: str = "sdpa"):
    """A seeded stock model and an AdaInfer model holding the same weights (eval mode, fp32)."""
    stock_cls, ada_cls, cfg_fn = VARIANTS[variant]
    torch.manual_seed(seed)
    config = cfg_fn()
    config._attn_implementation = attn
    stock = stock_cls(config).eval()
    if variant in NEW_FAMILIES:
        # stock init leaves biases at 0 and norm weights at 1 (Gemma: 0 in `1 + w`): perturb every 1-D
        # parameter so q/k/v biases, k_norm and the norms' weights take part in every comparison
        with torch.no_grad():
            for param in stock.parameters():
                if param.dim() == 1:
                    param.add_(0.1 * torch.randn_like(param))
    ada = ada_cls(config).eval()
    missing = ada.load_state_dict(stock.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return stock, ada


def batch(padding: str = "left", seed: int = 1, batch_size: int = 3, length: int = 9):
    """Random token ids and a mask with one padded row (`padding` = "left", "right" or "none")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, -3:] = 0
    return ids, mask


def truncated_stock(stock, k: int):
    """The stock model cut to its first `k` decoder layers, same weights (the "exit everywhere at k" reference)."""
    fields = {**stock.config.to_dict(), "num_hidden_layers": k}
    if fields.get("layer_types"):
        fields["layer_types"] = fields["layer_types"][:k]  # (configs validate one type per layer)
    config = stock.config.__class__(**fields)
    config._attn_implementation = stock.config._attn_implementation
    model = stock.__class__(config).eval()
    result = model.load_state_dict(stock.state_dict(), strict=False)
    assert not result.missing_keys
    return model


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("w3".."w98"; 0 = pad, 1 = bos, 2 = eos), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>", padding_side="left")
