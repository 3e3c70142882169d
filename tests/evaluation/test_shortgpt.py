"""ShortGPT: Block Influence against the stock model's hidden states, and a pruned model that really skips layers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair, tiny_tokenizer

from adainfer_hf.evaluation.shortgpt import block_influence, prune_layers, shortgpt_layers_to_remove

L = 4

TEXTS = ["w5 w6 w7 w8 w9", "w10 w11", "w40 w41 w42 w43 w44 w45 w46", "w3"]


def _stock_without(stock, remove):
    """Independent reference: a fresh stock model built with `L - len(remove)` layers, loaded with the kept weights."""
    keep = [i for i in range(L) if i + 1 not in remove]
    config = stock.config.__class__(**{**stock.config.to_dict(), "num_hidden_layers": len(keep)})
    config._attn_implementation = stock.config._attn_implementation
    ref = stock.__class__(config).eval()
    state = {}
    for key, value in stock.state_dict().items():
        if ".layers." in key:
            prefix, rest = key.split(".layers.")
            idx, tail = rest.split(".", 1)
            if int(idx) in keep:
                state[f"{prefix}.layers.{keep.index(int(idx))}.{tail}"] = value
        else:
            state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref


def test_block_influence_from_stock_hidden_states():
    stock, ada = make_pair("llama_gqa")
    tok = tiny_tokenizer()
    bi = block_influence(ada, tok, TEXTS, batch_size=3)
    # Reference: per text (no padding), cosine between consecutive hidden states of the stock model, averaged over
    # every token. output_hidden_states' last entry is after the final norm, so the last layer's output is hooked.
    last_out = []
    handle = stock.model.layers[-1].register_forward_hook(lambda m, a, o: last_out.append(o[0] if isinstance(o, tuple) else o))
    sums, count = torch.zeros(L, dtype=torch.float64), 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            hs = stock(ids, output_hidden_states=True).hidden_states
            states = [*hs[:L], last_out.pop()]
            for i in range(L):
                sums[i] += torch.nn.functional.cosine_similarity(states[i][0].double(), states[i + 1][0].double(),
                                                                 dim=-1).sum()
            count += ids.shape[1]
    handle.remove()
    expected = 1 - sums / count
    assert torch.allclose(torch.from_numpy(bi), expected, atol=1e-5)
    assert shortgpt_layers_to_remove(bi, 2) == sorted(int(i) + 1 for i in expected.argsort()[:2])


def test_layers_to_remove_validates():
    assert shortgpt_layers_to_remove([0.3, 0.1, 0.2, 0.1], 2) == [2, 4]
    assert shortgpt_layers_to_remove([0.3, 0.1], 0) == []
    with pytest.raises(ValueError, match="n must be an int in"):
        shortgpt_layers_to_remove([0.3, 0.1], 2)


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln", "opt_350m_layout"])
def test_pruned_equals_stock_built_without_the_layers(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    remove = [2, 3]
    ref = _stock_without(stock, remove)
    before = ada(ids, attention_mask=mask, exit_policy=None).logits
    pruned = prune_layers(ada, remove)
    with torch.no_grad():
        out = pruned(ids, attention_mask=mask, exit_policy=None)
        expected = ref(ids, attention_mask=mask)
        # with a KV cache: the renumbered attention layers must index the pruned cache
        gen = pruned.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, exit_policy=None)
        gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert (out.logits - expected.logits).abs().max() <= 1e-5
    assert torch.equal(out.exit_layers, torch.full((3,), L - 2))
    assert torch.equal(gen, gen_ref)
    # the original is untouched: config, layers, attention indices, outputs
    assert ada.config.num_hidden_layers == L and pruned.config.num_hidden_layers == L - 2
    layers = ada.model.layers if hasattr(ada.model, "layers") else ada.model.decoder.layers
    assert len(layers) == L and [layer.self_attn.layer_idx for layer in layers] == list(range(L))
    assert torch.equal(ada(ids, attention_mask=mask, exit_policy=None).logits, before)


def test_pruned_model_runs_fewer_layers_and_shares_weights():
    stock, ada = make_pair("llama_gqa")
    pruned = prune_layers(ada, [1, 3])
    calls = [0] * L
    # q_proj / mlp modules are shared with the original: a hook on them counts the layers that actually run.
    handles = [layer.self_attn.q_proj.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(ada.model.layers)]
    ids, mask = batch("none")
    with torch.no_grad():
        pruned(ids, attention_mask=mask, exit_policy=None)
    for h in handles:
        h.remove()
    assert calls == [0, 1, 0, 1]
    assert pruned.model.layers[0].mlp.down_proj.weight is ada.model.layers[1].mlp.down_proj.weight
    assert pruned.lm_head.weight is ada.lm_head.weight


def test_prune_layers_validates():
    _, ada = make_pair("llama_gqa")
    with pytest.raises(ValueError, match="must name fewer than 4 distinct layers"):
        prune_layers(ada, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="in \\[1, 4\\]"):
        prune_layers(ada, [0])
