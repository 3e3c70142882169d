"""The families beyond Llama/OPT (Qwen2 with biases and sliding windows, Qwen3, Mistral, Gemma3 text) against the
stock transformers classes: exits, both cache options in `generate`, sliding windows shorter than the sequence,
the auto class and the artifact round trip. (The forward matrix of test_modeling.py covers them too.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from tiny_models import (
    NEW_FAMILIES,
    WINDOW,
    FeatureHashExit,
    assert_scores_are_the_no_cache_lens,
    batch,
    make_pair,
    truncated_stock,
)
from tiny_models import generate_greedy as _gen
from transformers import GPT2Config

from adainfer_hf import (
    AdaInferGemma3ForCausalLM,
    AutoAdaInferForCausalLM,
    ExitClassifier,
    ScriptedExit,
    load_adainfer_model,
)
from adainfer_hf.architectures import core as arch
from adainfer_hf.cache.exact import ExactExitCache
from adainfer_hf.compat import output_cache

L = 4
MODES = ["propagate", "exact"]


def test_sequences_run_past_the_sliding_window():
    ids, _ = batch("left")
    assert ids.shape[1] > 2 * WINDOW
    for variant in ("qwen2_sliding", "mistral_sliding", "gemma3_text"):
        stock, _ = make_pair(variant)
        assert any(arch.spec_of(stock).sliding_window(stock, i) == WINDOW for i in range(L)), variant
    stock, _ = make_pair("gemma3_text")
    assert stock.config.final_logit_softcapping is not None
    assert [arch.spec_of(stock).sliding_window(stock, i) for i in range(L)] == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("variant", NEW_FAMILIES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exit_at_k_equals_stock_cut_to_k(variant, k):
    """Every row exits at k: last-position logits equal the stock model cut to k layers (its final norm, head and,
    for Gemma3, the final softcap), with left padding and a prompt longer than the window."""
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    with torch.no_grad():
        ref = truncated_stock(stock, k)(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit(k))
    assert out.exit_layers.tolist() == [k] * 3
    assert (out.logits[:, -1] - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", NEW_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_never_exit_generate_is_stock(variant, mode):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    searches = ({}, {"num_beams": 2}) if variant in ("qwen2_sliding", "gemma3_text") else ({},)
    for kw in searches:
        ref = _gen(stock, ids, mask, max_new_tokens=6, **kw)
        out = _gen(ada, ids, mask, max_new_tokens=6, exit_policy=ScriptedExit(L, check_every_layer=True),
                   exit_cache=mode, **kw)
        assert torch.equal(out, ref), kw


@pytest.mark.parametrize("variant", NEW_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_exit_everywhere_at_k_generates_as_the_truncated_stock(variant, mode):
    """Every token exits at 2: greedy and beam search equal the stock model cut to 2 layers with a full cache."""
    stock, ada = make_pair(variant)
    short = truncated_stock(stock, 2)
    ids, mask = batch("left")
    for kw in ({}, {"num_beams": 2}):
        ref = _gen(short, ids, mask, max_new_tokens=7, **kw)
        out = _gen(ada, ids, mask, max_new_tokens=7, exit_policy=ScriptedExit(2), exit_cache=mode,
                   return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), kw


@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_exact_cache_matches_dense_no_cache_recompute(variant):
    """Exact option with varied exits: each token's scores are the logit lens, at its exit layer, of a dense
    no-cache forward over the prefix (the owed positions' catch-up uses the layer's own mask and rotary table)."""
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    out = _gen(ada, ids, mask, max_new_tokens=7, exit_policy=FeatureHashExit(), exit_cache="exact",
               return_dict_in_generate=True, output_scores=True)
    exits = out.exit_layers
    assert len(set(exits.flatten().tolist())) > 1
    assert isinstance(output_cache(out), ExactExitCache)
    assert_scores_are_the_no_cache_lens(stock, out, ids, mask)


def _propagate_reference(stock, sequences, mask, exits_per_position):
    """No-cache recompute of state propagation: decoder layer l leaves the hidden state of every position that
    exited before l unchanged (so its K/V in layer l come from its exit state); returns each layer's output."""
    outputs = []

    def hook(idx):
        def fn(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            frozen = (exits_per_position <= idx).unsqueeze(-1)  # exited after a layer before this one
            out = torch.where(frozen, inp, out)
            outputs.append(out)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(arch.spec_of(stock).decoder_layers(stock))]
    try:
        with torch.no_grad():
            logits = stock(sequences, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return outputs, logits


@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_propagate_cache_matches_no_cache_propagation_recompute(variant):
    """Propagate option with varied exits: each step's scores equal the lens, at its exit layer, of a no-cache
    recompute where every earlier position's deeper-layer K/V come from its exit state (sliding windows, biases,
    k_norm and Gemma3's two rotary tables all enter the fill)."""
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    out = _gen(ada, ids, mask, max_new_tokens=7, exit_policy=FeatureHashExit(), return_dict_in_generate=True,
               output_scores=True)
    exits = out.exit_layers  # [3, steps]: depth of the step whose input is the prompt (0) or token j-1
    assert len(set(exits.flatten().tolist())) > 1
    n_prompt, steps = ids.shape[1], exits.shape[1]
    per_pos = torch.cat([exits[:, :1].expand(-1, n_prompt), exits[:, 1:]], 1)  # exit layer of each fed position
    cache = output_cache(out)
    assert all(cache.get_seq_length(i) == n_prompt + steps - 1 for i in range(L))
    full_mask = torch.cat([mask, torch.ones(3, steps - 1, dtype=mask.dtype)], 1)
    outputs, logits = _propagate_reference(stock, out.sequences[:, :-1], full_mask, per_pos)
    for step in range(steps):
        pos = n_prompt - 1 + step
        for row in range(3):
            k = int(exits[row, step])
            lens = logits[row, pos] if k == L else arch.ExitHead(stock).logits(outputs[k - 1][row, pos])
            assert (out.scores[step][row] - lens).abs().max() <= 1e-4, (step, row, k)


def _classifier(model):
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(200, 2))
    y = (X[:, 1] > 0.02).astype(int)  # fires almost always
    return ExitClassifier(LogisticRegression().fit(X, y), min_layer=2).bind(model)


@pytest.mark.parametrize("variant", ["qwen2_sliding", "qwen3", "gemma3_text"])
def test_artifact_round_trip_through_the_auto_class(variant, tmp_path):
    _, ada = make_pair(variant)
    ada.exit_classifier = _classifier(ada)
    ids, mask = batch("left")
    with torch.no_grad():
        before = ada(ids, attention_mask=mask, use_cache=False)
    ada.save_pretrained(tmp_path)
    loaded = AutoAdaInferForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(ada) and isinstance(loaded.exit_classifier, ExitClassifier)
    assert type(load_adainfer_model(tmp_path)) is type(ada)
    with torch.no_grad():
        after = loaded(ids, attention_mask=mask, use_cache=False)
    assert torch.equal(after.exit_layers, before.exit_layers) and after.exit_layers.tolist() == [2, 2, 2]
    assert torch.allclose(after.logits, before.logits, atol=1e-6)


def test_unsupported_model_type_is_refused_with_the_supported_list(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=99)
    with pytest.raises(NotImplementedError, match="gemma3_text.*|.*qwen3"):
        arch.spec_for(config)
    config.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="'gpt2'.*supported model types.*qwen2"):
        AutoAdaInferForCausalLM.from_pretrained(tmp_path)


def test_gemma3_fill_uses_each_layers_rotary_table():
    """The deeper layers of a Gemma3 model get K/V rotated with their own (local or global) table."""
    stock, _ = make_pair("gemma3_text")
    hidden = torch.randn(2, 9, 32)
    pos = torch.arange(9)[None]
    spec = arch.spec_of(stock)
    fill = spec.fill_position_embeddings(stock, hidden, {"position_ids": pos})
    stacked = arch.kv_fill_of(stock).stacked(hidden, 0, fill)
    for idx, layer in enumerate(spec.decoder_layers(stock)):
        own = spec.position_embeddings(stock, hidden, pos, layer)
        key, _ = spec.layer_kv_states(stock, layer, hidden, own)
        torch.testing.assert_close(stacked[idx][0], key)
    local = spec.position_embeddings(stock, hidden, pos, spec.decoder_layers(stock)[0])
    glob = spec.position_embeddings(stock, hidden, pos, spec.decoder_layers(stock)[1])
    assert not torch.allclose(local[0], glob[0])  # the two tables really differ
    assert isinstance(AutoAdaInferForCausalLM.class_for(stock.config), type)
    assert AutoAdaInferForCausalLM.class_for(stock.config) is AdaInferGemma3ForCausalLM


@pytest.mark.slow
def test_real_gemma3_270m_never_exit_is_stock_and_exit_is_the_lens():
    """Gemma-3-270M (converted benchmark checkpoint; skipped unless already converted): a never-firing AdaInfer
    model gives the stock forward's logits on two short prompts, and an exit at 9 of 18 layers gives the lens of
    the stock hidden state there (norm, tied head, softcap)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    real_models = pytest.importorskip("benchmarks.common.real_models")
    if not real_models.is_available("gemma3-270m"):
        pytest.skip("gemma3-270m is not converted (benchmarks/common/real_models.py converts it once)")
    from transformers import AutoTokenizer

    path = real_models.model_dir("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "1, 2, 3, 4,"], return_tensors="pt", padding=True)
    ada = AutoAdaInferForCausalLM.from_pretrained(path, dtype=torch.float32, exit_classifier=None).eval()
    assert type(ada) is AdaInferGemma3ForCausalLM
    with torch.no_grad():
        # no policy: the stock Gemma3ForCausalLM.forward runs (one load instead of two)
        ref = ada(**enc, output_hidden_states=True, use_cache=False, exit_policy=None)
        never = ada(**enc, use_cache=False, exit_policy=ScriptedExit(ada.config.num_hidden_layers,
                                                                     check_every_layer=True))
        early = ada(**enc, use_cache=False, exit_policy=ScriptedExit(9), logits_to_keep=1)
    assert (never.logits - ref.logits).abs().max() <= 1e-3
    lens = arch.ExitHead(ada).logits(ref.hidden_states[9][:, -1])
    assert early.exit_layers.tolist() == [9, 9]
    assert (early.logits[:, -1] - lens).abs().max() <= 1e-3
