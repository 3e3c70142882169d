"""The model classes against the stock transformers classes holding the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VARIANTS, batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit
from adainfer_hf.architectures import core as arch
from adainfer_hf.compat import output_cache
from adainfer_hf.policy.features import compute_features

L = 4  # layers of the tiny models


class NeverExit(ExitPolicy):
    """Checks after every layer (so the whole check path runs) but never fires."""

    def __init__(self, features=("gap", "top_prob")):
        self.features = tuple(features)
        self.min_layer = 1
        self.check_layers = None
        self.seen = []

    def decide(self, features, layer, rows, state=None):
        self.seen.append((layer, features.clone(), rows.clone()))
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def _lens(stock, hidden_states, layer, row):
    """Independent reference: the logit lens of the stock model's hidden state after `layer`."""
    if layer == L:
        return arch.ExitHead(stock).final(hidden_states[L][row])  # LM head [+ Gemma3's final softcap]
    return arch.ExitHead(stock).logits(hidden_states[layer][row])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_keys_are_stock(variant):
    stock, ada = make_pair(variant)
    assert list(stock.state_dict()) == list(ada.state_dict())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("policy", ["none", "never"])
def test_identical_to_stock_without_exit(variant, padding, policy):
    stock, ada = make_pair(variant)
    ids, mask = batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False)
        out = ada(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False,
                  exit_policy=None if policy == "none" else NeverExit())
    assert torch.equal(out.exit_layers, torch.full((3,), L))
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert (out.loss - ref.loss).abs() <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states) == L + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (a - b).abs().max() <= 1e-5
    if policy == "none":  # the plain path is the stock code path: bitwise
        assert torch.equal(out.logits, ref.logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_exit_returns_logit_lens_at_exit_layer(variant, padding):
    stock, ada = make_pair(variant)
    ids, mask = batch(padding)
    exits = [1, 3, L]  # row 2 never exits
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit(exits, check_every_layer=True))
    assert out.exit_layers.tolist() == exits
    for row, k in enumerate(exits):
        # every position of the row carries the exit layer's state, so the whole row is the lens at k
        assert (out.logits[row] - _lens(stock, ref.hidden_states, k, row)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
def test_layers_after_exit_do_not_run(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    calls = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, args, kwargs, out, i=i: calls.append((i, args[0].shape[0] if args else kwargs["hidden_states"].shape[0])),
        with_kwargs=True) for i, layer in enumerate(arch.spec_of(ada).decoder_layers(ada))]
    with torch.no_grad():
        ada(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit([1, 2, 2]))
    for h in hooks:
        h.remove()
    # layer 1 runs all three rows, layer 2 only the two still going, layers 3-4 none
    assert calls == [(0, 3), (1, 2)]


def test_logits_to_keep_one_reuses_check_logits():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        out = ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=ScriptedExit([2, 4, 1]))
    assert out.logits.shape == (3, 1, 99)
    for row, k in enumerate([2, 4, 1]):
        assert (out.logits[row, -1] - _lens(stock, ref.hidden_states, k, row)[-1]).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln", "opt_350m_layout"])
def test_features_match_logit_lens_reference(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("right")
    names = ("gap", "top_prob", "delta_gap", "gap_x_top_prob", "cos_hidden", "kl_prev")
    policy = NeverExit(names)
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy)
    last = mask.sum(-1) - 1  # right padding
    assert [s[0] for s in policy.seen] == [1, 2, 3]
    prev_probs = None
    for layer, feats, _rows in policy.seen:
        h = ref.hidden_states[layer][torch.arange(3), last]
        probs = F.softmax(arch.ExitHead(stock).logits(h), -1)
        top = probs.topk(2, -1).values
        gap, top_prob = top[:, 0] - top[:, 1], top[:, 0]
        h_prev = ref.hidden_states[layer - 1][torch.arange(3), last]
        torch.testing.assert_close(feats[:, 0], gap, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats[:, 1], top_prob, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats[:, 3], gap * top_prob, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats[:, 4], F.cosine_similarity(h, h_prev, dim=-1), atol=1e-5, rtol=1e-4)
        if prev_probs is None:
            assert torch.all(feats[:, 2] == 0) and torch.all(feats[:, 5] == 0)
        else:
            kl = (probs * (probs.log() - prev_probs.log())).sum(-1)
            torch.testing.assert_close(feats[:, 5], kl, atol=1e-4, rtol=1e-3)
        prev_probs = probs


def test_sublayer_cosine_features_match_hooks_on_stock():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    outs = {}
    hooks = []
    for i, layer in enumerate(arch.spec_of(stock).decoder_layers(stock)):
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(("a", i), o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(("m", i), o)))
    policy = NeverExit(("cos_attn", "cos_mlp"))
    with torch.no_grad():
        stock(ids, use_cache=False)
        ada(ids, use_cache=False, exit_policy=policy)
    for h in hooks:
        h.remove()
    for layer, feats, _ in policy.seen:
        if layer == 1:
            assert torch.all(feats == 1)
            continue
        for col, key in enumerate(("a", "m")):
            cur, prev = outs[(key, layer - 1)][:, -1], outs[(key, layer - 2)][:, -1]
            torch.testing.assert_close(feats[:, col], F.cosine_similarity(cur, prev, dim=-1), atol=1e-5, rtol=1e-4)


def test_compute_features_rejects_unknown_name():
    with pytest.raises(ValueError, match="'entropy'"):
        compute_features(("entropy",), torch.zeros(2, 5))


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout"])
def test_cache_stays_aligned_after_exit(variant):
    """A forward that carries a KV cache fills the layers a row skipped, so every layer has every position."""
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, use_cache=True, exit_policy=ScriptedExit([1, 2, L]))
        lengths = [output_cache(out).layers[i].keys.shape[-2] for i in range(L)]
        assert lengths == [ids.shape[1]] * L
        nxt = torch.randint(3, 99, (3, 1))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        out2 = ada(nxt, attention_mask=mask2, past_key_values=output_cache(out), use_cache=True,
                   exit_policy=ScriptedExit([2, 1, 3]))
    assert [output_cache(out2).layers[i].keys.shape[-2] for i in range(L)] == [ids.shape[1] + 1] * L
    assert out2.exit_layers.tolist() == [2, 1, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    stock, ada = make_pair("llama_gqa")
    stock, ada = stock.to(dtype), ada.to(dtype)
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        plain = ada(ids, attention_mask=mask, use_cache=False, exit_policy=None)
        out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit([2, 2, 2]))
    assert torch.equal(plain.logits, ref.logits)
    assert out.logits.dtype == dtype
    lens = arch.ExitHead(stock).logits(ref.hidden_states[2][:, -1])
    assert (out.logits[:, -1] - lens).abs().max() <= 1e-2


def test_half_precision_check_head_on_fp32_model():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    policy = ScriptedExit([2, 2, 4], check_dtype="bfloat16")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        out = ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=policy)
        copy = ada.exit_head.weight_as(torch.bfloat16)[0]
        ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=policy)
    assert ada.exit_head.weight_as(torch.bfloat16)[0] is copy and copy.dtype == torch.bfloat16  # converted once
    assert not any("exit_head" in k for k in ada.state_dict())  # not a parameter or buffer
    assert out.logits.dtype == torch.float32
    lens = arch.ExitHead(stock).logits(ref.hidden_states[2][:2, -1])
    assert (out.logits[:2, -1] - lens).abs().max() <= 2e-2
    assert (out.logits[2, -1] - ref.logits[2, -1]).abs().max() <= 1e-5  # full depth: the fp32 head
    with pytest.raises(ValueError, match="'int8'"):
        ScriptedExit(2, check_dtype="int8")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stacked_kv_fill_equals_layer_by_layer(variant):
    """The one-matmul fill of all deeper layers gives the K/V each layer's own projection gives."""
    _, ada = make_pair(variant)
    with torch.no_grad():  # norms start at weight 1, bias 0: perturb them so the folding is really exercised
        for name, param in ada.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    hidden = torch.randn(2, 5, ada.config.hidden_size)
    pos = torch.arange(5).unsqueeze(0)
    pe = arch.spec_of(ada).position_embeddings(ada, hidden, pos)
    with torch.no_grad():
        stacked = arch.kv_fill_of(ada).stacked(hidden, 1, pe)
        assert len(stacked) == L - 1
        for (k, v), layer in zip(stacked, arch.spec_of(ada).decoder_layers(ada)[1:], strict=True):
            k_ref, v_ref = arch.spec_of(ada).layer_kv_states(ada, layer, hidden, pe)
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)
