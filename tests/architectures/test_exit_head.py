"""The exit head's kept copies (check-dtype head, shortlisted rows, fused K/V) follow every way users edit a model:
each test makes the same edit to the stock model and compares an exit with the stock model cut at the exit layer
(or the eager K/V fill with the deferred one, which reads the live modules)."""

from __future__ import annotations

import io
import pickle
import weakref

import pytest
import torch
from tiny_models import VARIANTS, VOCAB, batch, make_pair, truncated_stock

from adainfer_hf import ScriptedExit
from adainfer_hf.architectures import few_rows

peft = pytest.importorskip("peft")

SHORTLIST = tuple(range(3, 80, 3))
K = 2  # every row exits after layer K


def _policies():
    return {"shortlist": ScriptedExit(K, check_vocabulary=SHORTLIST),
            "bf16": ScriptedExit(K, check_dtype="bfloat16"),
            "bf16+shortlist": ScriptedExit(K, check_dtype="bfloat16", check_vocabulary=SHORTLIST)}


def _tolerance(name):
    return 3e-2 if "bf16" in name else 1e-5


def _exit_logits(ada, policy, ids, mask):
    with torch.no_grad():
        return ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=policy).logits[:, -1]


def _cut_logits(stock, ids, mask):
    with torch.no_grad():
        return truncated_stock(stock, K)(ids, attention_mask=mask, use_cache=False).logits[:, -1]


def _assert_exits_are_cut_stock(ada, stock, ids, mask, policies=None):
    ref = _cut_logits(stock, ids, mask)
    for name, policy in (policies or _policies()).items():
        out = _exit_logits(ada, policy, ids, mask)
        keep = list(SHORTLIST) if policy.check_vocabulary else slice(None)
        diff = (out[:, keep] - ref[:, keep]).abs().max().item()
        assert diff <= _tolerance(name), (name, diff)


def _head_weight(model, variant):
    # tied heads: edit through the embedding, which is the same tensor
    return model.model.embed_tokens.weight if variant == "llama_tied" else model.get_output_embeddings().weight


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied", "opt_pre_ln"])
def test_copies_follow_data_writes_to_the_head(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    policies = _policies()
    _assert_exits_are_cut_stock(ada, stock, ids, mask, policies)  # builds every copy
    for model in (stock, ada):
        _head_weight(model, variant).data.mul_(-1.5)  # `.data`: same storage, same `_version`
    _assert_exits_are_cut_stock(ada, stock, ids, mask, policies)


def test_copies_follow_an_edit_inside_one_generate():
    """A `generate` checks each copy once: an edit between two generates is seen by the second."""
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    policy = ScriptedExit(K, check_vocabulary=SHORTLIST)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ada.generate(ids, attention_mask=mask, exit_policy=policy, **kw)
        for model in (stock, ada):
            model.lm_head.weight.data.mul_(-1.5)
        out = ada.generate(ids, attention_mask=mask, exit_policy=policy, **kw)
    ref = _cut_logits(stock, ids, mask)
    torch.testing.assert_close(out.scores[0][:, list(SHORTLIST)], ref[:, list(SHORTLIST)], rtol=1e-5, atol=1e-5)


def test_refresh_drops_the_copies_after_an_edit_a_sample_may_miss():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    policies = _policies()
    _assert_exits_are_cut_stock(ada, stock, ids, mask, policies)
    for model in (stock, ada):
        model.lm_head.weight.data[SHORTLIST[4], 7] += 3.0  # one element
    ada.exit_head.refresh()
    _assert_exits_are_cut_stock(ada, stock, ids, mask, policies)


def _lora_on_head(model, seed=3, **kw):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False, **kw)
    return peft.get_peft_model(model, cfg).eval()


def test_lora_on_the_head_is_applied_by_every_check():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    _lora_on_head(stock)
    wrapped = _lora_on_head(ada)
    with torch.no_grad():
        hidden = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[K]
        normed = stock.model.norm(hidden[:, -1])
        ref = stock.lm_head(normed)  # stock modules: the LoRA Linear applies its adapter
        base = stock.lm_head.get_base_layer()(normed)
    assert (ref - base).abs().max() > 0.5  # (the adapter matters)
    for adapter_on, want in ((True, ref), (False, base)):
        for name, policy in _policies().items():
            if adapter_on:
                out = _exit_logits(wrapped, policy, ids, mask)
            else:
                with wrapped.disable_adapter():  # disabled: the base head
                    out = _exit_logits(wrapped, policy, ids, mask)
            keep = list(SHORTLIST) if policy.check_vocabulary else slice(None)
            diff = (out[:, keep] - want[:, keep]).abs().max().item()
            assert diff <= _tolerance(name), (adapter_on, name, diff)


@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_copies_follow_a_merged_lora_on_the_head(how):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    policies = _policies()
    _assert_exits_are_cut_stock(ada, stock, ids, mask, policies)  # copies of the base head
    merged = []
    for model in (stock, ada):
        wrapped = _lora_on_head(model)
        _exit_logits(wrapped, policies["shortlist"], ids, mask)
        if how == "merge_and_unload":
            merged.append(wrapped.merge_and_unload())  # PEFT writes `weight.data += delta`
        else:
            wrapped.merge_adapter()  # merged in place; the LoRA Linear stays, its forward reads the base layer
            merged.append(wrapped)
    with torch.no_grad():
        hidden = merged[0](ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[K]
        ref = stock.lm_head(stock.model.norm(hidden[:, -1]))
    for name, policy in policies.items():
        out = _exit_logits(merged[1], policy, ids, mask)
        keep = list(SHORTLIST) if policy.check_vocabulary else slice(None)
        diff = (out[:, keep] - ref[:, keep]).abs().max().item()
        assert diff <= _tolerance(name), (name, diff)


def test_a_head_wrapper_the_checks_cannot_apply_is_refused_by_name():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    wrapped = _lora_on_head(ada, use_dora=True)
    with pytest.raises(ValueError, match="DoraLinearVariant"):
        _exit_logits(wrapped, ScriptedExit(K, check_vocabulary=SHORTLIST), ids, mask)
    _exit_logits(wrapped, ScriptedExit(K), ids, mask)  # the full head in the model's dtype: the module itself


def test_copies_follow_resize_to_and_load_state_dict():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    _assert_exits_are_cut_stock(ada, stock, ids, mask)
    for model in (stock, ada):
        model.resize_token_embeddings(VOCAB - 10)  # keeps the first rows: a new tensor, same values
    _assert_exits_are_cut_stock(ada, stock, ids, mask)
    other, _ = make_pair("llama_gqa", seed=5)
    other.resize_token_embeddings(VOCAB - 10)
    ada.load_state_dict(other.state_dict())  # in place
    _assert_exits_are_cut_stock(ada, other, ids, mask)
    for model in (other, ada):
        model.to(torch.bfloat16)
    ref = _cut_logits(other, ids, mask)
    out = _exit_logits(ada, ScriptedExit(K, check_vocabulary=SHORTLIST), ids, mask)
    assert out.dtype == torch.bfloat16
    assert (out[:, list(SHORTLIST)].float() - ref[:, list(SHORTLIST)].float()).abs().max() <= 5e-2


def _eager_vs_deferred(ada, ids, mask):
    """Next-step logits after a prompt whose rows all exited at K: eager fill (DynamicCache, the fused weight)
    vs deferred fill (PropagateExitCache: the live modules)."""
    from transformers import DynamicCache

    from adainfer_hf import PropagateExitCache

    outs = []
    for cache in (DynamicCache(config=ada.config), PropagateExitCache(config=ada.config)):
        with torch.no_grad():
            ada(ids, attention_mask=mask, past_key_values=cache, exit_policy=ScriptedExit(K))
            nxt = torch.full((ids.shape[0], 1), 5)
            m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            outs.append(ada(nxt, attention_mask=m2, past_key_values=cache, exit_policy=None).logits)
    return outs


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln"])
def test_fused_kv_follows_data_writes(variant):
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    _eager_vs_deferred(ada, ids, mask)  # builds the fused weight
    layers = ada.model.decoder.layers if variant.startswith("opt") else ada.model.layers
    for layer in layers:
        layer.self_attn.k_proj.weight.data.mul_(-1.5)
        layer.self_attn.v_proj.weight.data.add_(0.3)
    eager, deferred = _eager_vs_deferred(ada, ids, mask)
    torch.testing.assert_close(eager, deferred, rtol=1e-4, atol=1e-4)


def test_fused_kv_follows_a_merged_kv_lora():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    _eager_vs_deferred(ada, ids, mask)  # builds the fused weight
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    merged = peft.get_peft_model(ada, cfg).eval().merge_and_unload()
    eager, deferred = _eager_vs_deferred(merged, ids, mask)
    torch.testing.assert_close(eager, deferred, rtol=1e-4, atol=1e-4)


def test_copies_are_kept_while_nothing_changes():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    policy = ScriptedExit(K, check_vocabulary=SHORTLIST, check_dtype="bfloat16")
    head = ada.exit_head
    _exit_logits(ada, policy, ids, mask)
    rows = head.rows(head.vocabulary(SHORTLIST), torch.bfloat16)[0]
    _eager_vs_deferred(ada, ids, mask)
    fused = ada.kv_fill.fused(torch.device("cpu"))[0]
    for _ in range(3):
        _exit_logits(ada, policy, ids, mask)
        _eager_vs_deferred(ada, ids, mask)
    assert head.rows(head.vocabulary(SHORTLIST), torch.bfloat16)[0] is rows
    assert ada.kv_fill.fused(torch.device("cpu"))[0] is fused


def test_model_pickles_after_per_call_policies_and_kept_copies():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    policy = ScriptedExit(K, check_vocabulary=SHORTLIST, check_dtype="bfloat16")
    before = _exit_logits(ada, policy, ids, mask)  # a per-call exit_policy, with every copy built
    _eager_vs_deferred(ada, ids, mask)
    assert not any(isinstance(v, weakref.ref) for v in ada.__dict__.values())
    loaded = pickle.loads(pickle.dumps(ada))
    buffer = io.BytesIO()
    torch.save(ada, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    for model in (loaded, reloaded):
        torch.testing.assert_close(_exit_logits(model, policy, ids, mask), before)
        assert model.exit_head.model is model and model.kv_fill.model is model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_final_rows_is_the_stock_head_on_several_positions(variant, monkeypatch):
    """Verification's head over several positions (`final_rows`) gives the stock LM head's logits (and the
    family's softcap), row for row, for every shape it is called with (the tiny heads routed to the product)."""
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 1)
    monkeypatch.setattr(few_rows, "KERNEL", "product")
    _, ada = make_pair(variant)
    head = ada.exit_head
    for shape in ((1, 1), (1, 2), (1, 5), (3, 4)):
        with torch.no_grad():
            normed = head.norm(torch.randn(*shape, ada.config.hidden_size))
            ref = head.spec.finalize_logits(ada, ada.get_output_embeddings()(normed))
            out = head.final_rows(normed)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_final_rows_takes_the_module_call_where_the_head_is_hooked_or_wrapped():
    """A forward hook on the LM head, or a LoRA wrapper, sees verification's head call (the module runs)."""
    _, ada = make_pair("llama_gqa")
    calls = []
    handle = ada.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape))
    normed = torch.randn(1, 3, ada.config.hidden_size)
    with torch.no_grad():
        ada.exit_head.final_rows(normed)
    handle.remove()
    assert calls == [torch.Size([1, 3, ada.config.vocab_size])]
    _lora_on_head(ada)
    lora = ada.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(ada.exit_head.final_rows(normed), lora(normed), rtol=1e-5, atol=1e-5)
