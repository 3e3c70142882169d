"""What the tests share (the one helper module; test modules import helpers from here only).

- tiny random models (transformers' test sizes): a stock model and its AdaInfer twin (`make_pair`, `VARIANTS`,
  `truncated_stock`, `stock_llama`), random batches (`batch`) and a word-level tokenizer (`tiny_tokenizer`);
- models that read real prompts: a BPE tokenizer trained on the built-in tasks (`task_tokenizer`), models with its
  vocabulary (`tiny_pair`, `save_tiny_checkpoint`) and prompts (`tiny_prompts`);
- synthetic feature tables with known answers (`feature_table`, `settling_table`, `misleading_table`);
- the no-cache reference for generated scores (`assert_scores_are_the_no_cache_lens`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import (
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from adainfer_hf import (
    AdaInferGemma3ForCausalLM,
    AdaInferLlamaForCausalLM,
    AdaInferMistralForCausalLM,
    AdaInferOPTForCausalLM,
    AdaInferQwen2ForCausalLM,
    AdaInferQwen3ForCausalLM,
    ExitPolicy,
)
from adainfer_hf import tiny_models as tiny
from adainfer_hf.architectures import core as arch
from adainfer_hf.data.builtin_tasks import builtin_task, builtin_task_names
from adainfer_hf.data.prompts import build_prompts
from adainfer_hf.tiny_models import (  # noqa: F401  (re-exported: the tests import the configs from here)
    VOCAB,
    WINDOW,
    gemma3_config,
    llama_config,
    mistral_config,
    opt_config,
    qwen2_config,
    qwen3_config,
)
from adainfer_hf.training.table import FeatureTable

# name -> (stock class, adainfer class, config factory); the stock side and the configs are the package's one
# tiny-model factory (`adainfer_hf.tiny_models`, which `adainfer doctor` uses too).
_ADAINFER_CLASSES = {
    LlamaForCausalLM: AdaInferLlamaForCausalLM,
    OPTForCausalLM: AdaInferOPTForCausalLM,
    Qwen2ForCausalLM: AdaInferQwen2ForCausalLM,
    Qwen3ForCausalLM: AdaInferQwen3ForCausalLM,
    MistralForCausalLM: AdaInferMistralForCausalLM,
    Gemma3ForCausalLM: AdaInferGemma3ForCausalLM,
}
VARIANTS = {name: (stock_cls, _ADAINFER_CLASSES[stock_cls], make_config)
            for name, (stock_cls, make_config) in tiny.VARIANTS.items()}
NEW_FAMILIES = tiny.PERTURBED_VARIANTS


def make_pair(variant: str, seed: int = 0, attn: str = "sdpa"):
    """A seeded stock model and an AdaInfer model holding the same weights (eval mode, fp32)."""
    stock = tiny.stock_model(variant, seed=seed, attn=attn)
    ada = VARIANTS[variant][1](stock.config).eval()
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


# ---------------------------------------------------------------------- models that read real prompts
@functools.lru_cache(maxsize=1)
def task_tokenizer():
    """A byte-level BPE tokenizer (about 400 tokens) trained in-process on the built-in tasks' prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tasks = [builtin_task(n) for n in builtin_task_names()]
    corpus = [p.text + " " + p.answer for t in tasks for p in build_prompts(t, 2, limit=20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_pair(kind: str = "llama", seed: int = 0):
    """A stock model and its AdaInfer twin with the tiny tokenizer's vocabulary.

    The weights are initialised wider than transformers' default (0.02) so that the layers change the logit lens'
    top-1 and both labels occur, as in a trained model.
    """
    vocab = len(task_tokenizer())
    if kind == "llama":
        config = llama_config(vocab_size=vocab, pad_token_id=0, initializer_range=0.3)
        stock_cls, ada_cls = LlamaForCausalLM, AdaInferLlamaForCausalLM
    else:
        config = opt_config(
            vocab_size=vocab, pad_token_id=0, do_layer_norm_before=False, word_embed_proj_dim=16, init_std=0.1
        )
        stock_cls, ada_cls = OPTForCausalLM, AdaInferOPTForCausalLM
    torch.manual_seed(seed)
    stock = stock_cls(config).eval()
    ada = ada_cls(config).eval()
    ada.load_state_dict(stock.state_dict())
    return stock, ada


def save_tiny_checkpoint(path, kind: str = "llama"):
    """Writes a tiny AdaInfer-loadable checkpoint (weights + tokenizer) to `path`."""
    _, ada = tiny_pair(kind)
    ada.save_pretrained(path)
    task_tokenizer().save_pretrained(path)
    return path


def tiny_prompts(n_per_task: int = 3, shots=(0, 2)):
    """Prompts of three built-in tasks, `n_per_task` examples per shots value."""
    tasks = [builtin_task(n) for n in ("capitalize", "first_of_list", "next_number")]
    return [p for t in tasks for k in shots for p in build_prompts(t, k, limit=n_per_task)]


def stock_llama(seed: int = 0, num_hidden_layers: int = 4, **overrides) -> LlamaForCausalLM:
    """A seeded stock Llama of `llama_config` (eval mode)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(num_hidden_layers=num_hidden_layers, **overrides)).eval()


# ---------------------------------------------------------------------- synthetic feature tables
TABLE_LAYERS = 9  # layer count L of the synthetic tables
TABLE_BLANK = 0  # the "blank" token misleading_table puts on top


def feature_table(tokens, gap, top_prob, final, gold=None):
    """A two-feature (gap, top_prob) table from per-prompt `[P, K]` arrays; `K + 1` layers, three tasks."""
    P, K = tokens.shape
    return FeatureTable(
        X=np.stack([gap.reshape(-1), top_prob.reshape(-1)], 1),
        feature_names=("gap", "top_prob"),
        layer=np.tile(np.arange(1, K + 1), P),
        prompt_id=np.repeat(np.arange(P), K),
        top_token=tokens.reshape(-1),
        task=[f"task{i % 3}" for i in range(P)],
        shots=np.zeros(P),
        example_index=np.arange(P),
        final_token=final,
        gold_token=final if gold is None else gold,
        num_layers=np.full(P, K + 1),
    )


def settling_table(P, seed):
    """Each prompt's top-1 settles on the final token at a random layer; gap jumps there, with noise."""
    rng = np.random.default_rng(seed)
    K = TABLE_LAYERS - 1
    settle = rng.integers(2, TABLE_LAYERS + 1, size=P)  # == TABLE_LAYERS: only the last layer is right
    k = np.arange(1, K + 1)[None]
    right = k >= settle[:, None]
    final = 100 + np.arange(P)
    tokens = np.where(right, final[:, None], 50 + rng.integers(0, 10, (P, K)))
    gap = np.clip(0.25 + 0.5 * right + rng.normal(0, 0.15, (P, K)), 0, 1)
    return feature_table(tokens, gap, np.clip(gap + 0.05, 0, 1), final)


def misleading_table(P, seed, blank_share=0.2):
    """SmolLM2-like: every checked layer puts a blank on top with high confidence; only the last layer has the
    answer. Prompts whose answer is the blank itself (`blank_share`; many 0-shot prompts) are right at every
    layer, so a classifier trained on them learns "confident => exit".
    """
    rng = np.random.default_rng(seed)
    K = TABLE_LAYERS - 1
    blank_answer = rng.random(P) < blank_share
    final = np.where(blank_answer, TABLE_BLANK, 100 + np.arange(P))
    tokens = np.full((P, K), TABLE_BLANK)
    top_prob = rng.uniform(0.85, 0.98, (P, K))
    return feature_table(tokens, top_prob - rng.uniform(0.0, 0.05, (P, K)), top_prob, final)


class FeatureHashExit(ExitPolicy):
    """Varied, deterministic exits: fires where a digit of top_prob is even (exits differ by token and step)."""

    def __init__(self, min_layer=1):
        self.features = ("gap", "top_prob")
        self.min_layer = min_layer
        self.check_layers = None

    def decide(self, features, layer, rows, state=None):
        return (features[:, 1] * 1e4).long() % 2 == 0


def generate_greedy(model, ids, mask, **kw):
    """`model.generate` greedy, 6 new tokens and pad id 0 unless given, without gradients."""
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


def assert_scores_are_the_no_cache_lens(stock, out, ids, mask, atol=1e-4, tokens=False):
    """Each generated step's scores are the logit lens, at the row's recorded exit layer, of the stock model's
    dense no-cache forward over the whole prefix (so every K/V the step attended to was the dense one); with
    `tokens`, each greedy token is that lens's argmax too (only for runs no row ends early: after its EOS a
    row is padded)."""
    exits, n_prompt, B = out.exit_layers, ids.shape[1], ids.shape[0]
    L = stock.config.num_hidden_layers
    for step in range(exits.shape[1]):
        prefix = out.sequences[:, : n_prompt + step]
        pmask = torch.cat([mask, torch.ones(B, step, dtype=mask.dtype)], 1)
        with torch.no_grad():
            ref = stock(prefix, attention_mask=pmask, output_hidden_states=True, use_cache=False)
        for row in range(B):
            k = int(exits[row, step])
            lens = ref.logits[row, -1] if k == L else arch.ExitHead(stock).logits(ref.hidden_states[k][row, -1])
            assert (out.scores[step][row] - lens).abs().max() <= atol, (step, row, k)
            if tokens:
                assert int(out.sequences[row, n_prompt + step]) == int(lens.argmax()), (step, row, k)
