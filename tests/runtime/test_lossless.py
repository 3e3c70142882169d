"""Lossless early exit (`generate(..., lossless=True)`): greedy output is the stock class's `generate`, token for
token, on every family; drafts built right or wrong are accepted or rolled back as constructed; after a rollback
the cache is a stock recompute of the verified text."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VARIANTS, FeatureHashExit, batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit
from adainfer_hf.architectures import few_rows
from adainfer_hf.compat import output_cache

L = 4


def _gen(model, ids, mask, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


def _cast(stock, ada, dtype):
    return stock.to(dtype), ada.to(dtype)


def _assert_same_or_near_tie(stock, ref, got, mask, prompt_length, dtype):
    """Token identity, except where the stock model's own choice was a floating-point near-tie: at a row's first
    difference, the stock no-cache forward over the common prefix must have a top-2 margin within a few rounding
    steps of `dtype` (the batched catch-up computes the same sums in another order)."""
    if torch.equal(ref, got):
        return
    for row in range(ref.shape[0]):
        diff = (ref[row] != got[row]).nonzero()
        if not diff.numel():
            continue
        j = int(diff[0])
        assert j >= prompt_length, f"row {row}: the prompt changed"
        prefix = ref[row:row + 1, :j]
        pmask = torch.cat([mask[row:row + 1], torch.ones(1, j - prompt_length, dtype=mask.dtype)], 1)
        with torch.no_grad():
            logits = stock(prefix, attention_mask=pmask, use_cache=False).logits[0, -1].float()
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        tolerance = 8 * torch.finfo(dtype).eps * max(1.0, float(top2[0].abs()))
        assert margin <= tolerance, (f"row {row} differs at step {j - prompt_length} with a stock top-2 margin of "
                                     f"{margin:.3g} (> {tolerance:.3g}): not a near-tie")


class _KnocksOutTop:
    """Where `wrong(n)` holds for the n-th lens the policy sees, that lens loses its top token before the loop
    keeps it as exit logits: a draft made there is the runner-up (known wrong where the lens agreed with stock)."""

    def record(self, layer, rows, features, stats, logits):
        if self.wrong(self.calls):
            logits[torch.arange(logits.shape[0]), logits.argmax(-1)] = -math.inf
        self.calls += 1


class MixedDrafts(_KnocksOutTop, FeatureHashExit):
    """Varied exits (`FeatureHashExit`), every third lens knocked out: some drafts right, some wrong, on any
    family (tiny random models often agree with themselves at layer 1)."""

    def __init__(self):
        super().__init__()
        self.wrong, self.calls = (lambda n: n % 3 == 2), 0


# ---------------------------------------------------------------------------------------- identity with stock
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_stock_generate_on_every_family(variant, dtype):
    stock, ada = _cast(*make_pair(variant), dtype)
    ids, mask = batch("left", length=7)
    ref = _gen(stock, ids, mask, max_new_tokens=10)
    out = _gen(ada, ids, mask, max_new_tokens=10, exit_policy=MixedDrafts(), lossless=True,
               max_draft_tokens=3, return_dict_in_generate=True)
    _assert_same_or_near_tie(stock, ref, out.sequences, mask, ids.shape[1], dtype)
    assert out.sequences.shape == ref.shape
    # drafts were made and some rejected: the output is the verification's, not the exits'
    assert int(out.draft_tokens.sum()) > int(out.accepted_tokens.sum()) > 0
    assert out.exit_layers.shape == (3, 10) and int((out.exit_layers < L).sum()) == int(out.accepted_tokens.sum())


@pytest.mark.parametrize("n", range(1, 7))
def test_never_more_tokens_than_asked(n):
    stock, ada = _identity_last_layer()
    ids, mask = batch("left")
    ref = _gen(stock, ids, mask, max_new_tokens=n)
    for wrong, policy in ((True, ForcedDrafts(lambda i: True)), (False, ScriptedExit(L - 1))):
        out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=policy, lossless=True, max_draft_tokens=4,
                   return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref) and out.sequences.shape[1] == ids.shape[1] + n
        # drafts stop where a verified token could no longer follow them within the budget
        drafted, accepted = _expected_counts(lambda i, w=wrong: w, n, 4)
        assert out.draft_tokens.tolist() == [drafted] * 3 and out.accepted_tokens.tolist() == [accepted] * 3


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_sliding"])
def test_eos_mid_way_pads_the_row_as_stock(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    free = _gen(stock, ids, mask, max_new_tokens=8)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 stops at its 4th token; the others go on (or stop there too)
    ref = _gen(stock, ids, mask, max_new_tokens=8, eos_token_id=eos)
    out = _gen(ada, ids, mask, max_new_tokens=8, eos_token_id=eos, exit_policy=MixedDrafts(), lossless=True)
    assert torch.equal(out, ref)
    assert ref.shape[1] > ids.shape[1] + 4 and int(ref[0, -1]) == 0  # row 0 was padded after its EOS


# ---------------------------------------------------------------------------------------- constructed drafts
def _identity_last_layer(variant="llama_gqa"):
    """A pair whose last decoder layer adds nothing to the residual stream, so the logit lens after layer L-1 is
    the full-depth logits: an exit there drafts the stock token."""
    stock, ada = make_pair(variant)
    for model in (stock, ada):
        last = model.model.layers[-1]
        with torch.no_grad():
            last.self_attn.o_proj.weight.zero_()
            last.mlp.down_proj.weight.zero_()
    return stock, ada


class ForcedDrafts(_KnocksOutTop, ExitPolicy):
    """Exits every draft step after layer L-1 (on `_identity_last_layer`, a right draft); where `wrong(n)` holds for
    the n-th draft its top token is knocked out: the draft is the runner-up, known wrong."""

    def __init__(self, wrong):
        self.features = ("gap", "top_prob")
        self.check_layers = (L - 1,)
        self.wrong = wrong
        self.calls = 0

    def decide(self, features, layer, rows, state=None):
        return torch.ones(features.shape[0], dtype=torch.bool, device=features.device)


def _expected_counts(wrong, new_tokens, cap):
    """(drafted, accepted) of the protocol: after the prefill's token each run drafts min(cap, left - 1) tokens;
    the first wrong one is replaced by the stock token and the rest discarded, else a bonus token follows."""
    made = calls = drafted = accepted = 0
    made = 1
    while made < new_tokens:
        k = min(cap, new_tokens - made - 1)
        run = [wrong(calls + i) for i in range(k)]
        calls += k
        drafted += k
        good = run.index(True) if True in run else k
        accepted += good
        made += good + 1
    return drafted, accepted


SCRIPTS = {
    "always_right": lambda n: False,
    "always_wrong": lambda n: True,
    "alternating": lambda n: n % 2 == 1,
    "every_length": lambda n: n % 5 == 4,  # runs of 4 drafts accept 0..4 as the wrong one moves through them
    "rare": lambda n: n % 7 == 6,
}


@pytest.mark.parametrize("cap", [1, 4])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_constructed_drafts_are_accepted_or_rolled_back(script, cap):
    stock, ada = _identity_last_layer()
    ids, mask = batch("none", batch_size=1, length=6)
    ref = _gen(stock, ids, mask, max_new_tokens=16, output_scores=True, return_dict_in_generate=True)
    wrong = SCRIPTS[script]
    policy = ForcedDrafts(wrong)
    out = _gen(ada, ids, mask, max_new_tokens=16, exit_policy=policy, lossless=True, max_draft_tokens=cap,
               output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    drafted, accepted = _expected_counts(wrong, 16, cap)
    assert (int(out.draft_tokens[0]), int(out.accepted_tokens[0])) == (drafted, accepted)
    assert policy.calls == drafted  # one check per draft step, none in a verification
    layers = out.exit_layers[0].tolist()
    assert layers.count(L - 1) == accepted and layers.count(L) == 16 - accepted
    # the scores are the stock full-depth scores of each verified token (not the drafts' exit scores)
    for got, want in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cache_after_rollbacks_is_a_stock_recompute():
    """Every rollback length happens (always-wrong drafts, cap 5: each run of k drafts loses k - 1 positions)."""
    _cache_matches_recompute("llama_gqa", ForcedDrafts(lambda n: True), identity=True)


@pytest.mark.parametrize("variant", ["opt_350m_layout", "qwen2_sliding", "mistral_sliding", "gemma3_text"])
def test_cache_after_rollbacks_is_a_stock_recompute_on_sliding_and_post_ln_families(variant):
    _cache_matches_recompute(variant, MixedDrafts())


def _cache_matches_recompute(variant, policy, identity=False):
    stock, ada = _identity_last_layer(variant) if identity else make_pair(variant)
    ids, mask = batch("none", batch_size=1, length=6)
    rolled_back = 0
    for n in (5, 11):
        out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=policy, lossless=True, max_draft_tokens=5,
                   return_dict_in_generate=True)
        rolled_back += int(out.draft_tokens[0] - out.accepted_tokens[0])
        verified = out.sequences[:, :-1]  # the last token is never fed
        with torch.no_grad():
            ref = output_cache(stock(verified, use_cache=True))
        got = output_cache(out)
        assert got.pending_hidden is None and len(got.layers) == len(ref.layers)
        for i, (a, b) in enumerate(zip(got.layers, ref.layers, strict=True)):
            assert a.get_seq_length() == b.get_seq_length() == verified.shape[1], i
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4, msg=f"layer {i} keys")
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4, msg=f"layer {i} values")
    assert rolled_back > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lossless_through_the_few_rows_product_is_stock_generate(variant, monkeypatch):
    """With every weight routed (the tiny weights are below the real threshold), lossless greedy output is the
    stock class's `generate` (up to a floating-point near-tie), and verification did take the product."""
    calls = []
    real = few_rows.linear_few_rows
    monkeypatch.setattr(few_rows, "linear_few_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 1)
    monkeypatch.setattr(few_rows, "KERNEL", "product")
    stock, ada = make_pair(variant)
    ids, mask = batch("left", batch_size=2, length=7)  # 2 rows x 2 positions: within MAX_FEW_ROWS
    ref = _gen(stock, ids, mask, max_new_tokens=10)
    out = _gen(ada, ids, mask, max_new_tokens=10, exit_policy=MixedDrafts(), lossless=True, max_draft_tokens=1,
               return_dict_in_generate=True)
    _assert_same_or_near_tie(stock, ref, out.sequences, mask, ids.shape[1], torch.float32)
    assert int(out.draft_tokens.sum()) > 0 and calls
