"""Batched lossless decoding: the rows of a batch decode in lockstep in one `DraftExitCache`, accept different
numbers of drafts per step and are rolled back per row, and each row is still its stock continuation token for
token. References: the stock class's batched `generate` with the same weights, and (after every rollback) a stock
no-cache recompute of each row's verified text."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VARIANTS, FeatureHashExit, batch, make_pair

from adainfer_hf import ExitPolicy
from adainfer_hf.runtime import lockstep

L = 4
# families whose last layer can be made the identity (pre-LN: zeroed residual writes), sliding ones included
IDENTITY_VARIANTS = ["llama_gqa", "qwen2_sliding", "mistral_sliding", "gemma3_text", "qwen3", "opt_pre_ln"]
_RESIDUAL_WRITES = ("o_proj", "down_proj", "out_proj", "fc2")


def _gen(model, ids, mask, **kw):
    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


def _identity_last_layer(variant):
    """A pair whose last decoder layer adds nothing to the residual stream: the lens after layer L-1 is the
    full-depth logits, so an exit there drafts the stock token (unless the policy knocks it out)."""
    stock, ada = make_pair(variant)
    for model in (stock, ada):
        last = model.model.decoder.layers[-1] if hasattr(model.model, "decoder") else model.model.layers[-1]
        for name, module in last.named_modules():
            if name.rsplit(".", 1)[-1] in _RESIDUAL_WRITES:
                with torch.no_grad():
                    for p in module.parameters():
                        p.zero_()
    return stock, ada


def _left_padded(rows, length=7, seed=5):
    """`rows` random prompts, rows 1.. left-padded by 1, 2, 3 ... positions (row 0 unpadded)."""
    ids, mask = batch("none", seed=seed, batch_size=rows, length=length)
    for r in range(1, rows):
        mask[r, :min(r, length - 2)] = 0
    return ids, mask


def _near_tie_or_equal(stock, ref, got, mask, prompt_length, dtype):
    """Token identity, except at a row's first difference where the stock no-cache forward over the common prefix
    has a top-2 margin within a few rounding steps of `dtype` (the batched arithmetic sums in another order)."""
    assert got.shape == ref.shape
    for row in range(ref.shape[0]):
        diff = (ref[row] != got[row]).nonzero()
        if not diff.numel():
            continue
        j = int(diff[0])
        assert j >= prompt_length, f"row {row}: the prompt changed"
        keep = mask[row].bool()
        prefix = ref[row:row + 1, :j][:, torch.cat([keep, torch.ones(j - prompt_length, dtype=torch.bool)])]
        with torch.no_grad():
            logits = stock(prefix, use_cache=False).logits[0, -1].float()
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        tolerance = 8 * torch.finfo(dtype).eps * max(1.0, float(top2[0].abs()))
        assert margin <= tolerance, f"row {row} differs at step {j - prompt_length}: margin {margin:.3g}"


class PerRowDrafts(ExitPolicy):
    """Every row exits at layer L-1 on every draft step; at the n-th check the lens of batch row r loses its top
    token (a known-wrong draft on `_identity_last_layer`) where `wrong(r, n)`: rows accept different counts."""

    def __init__(self, wrong):
        self.features = ("gap", "top_prob")
        self.check_layers = (L - 1,)
        self.wrong, self.calls = wrong, 0

    def decide(self, features, layer, rows, state=None):
        return torch.ones(features.shape[0], dtype=torch.bool, device=features.device)

    def record(self, layer, rows, features, stats, logits):
        for i, r in enumerate(rows.tolist()):
            if self.wrong(r, self.calls):
                logits[i, logits[i].argmax()] = -math.inf
        self.calls += 1


class PerRowMixed(FeatureHashExit):
    """Varied exits per row (some rows fire, others run every layer: a mixed step verifies every row), and every
    row's lens knocked out on a per-row schedule: on any family, post-LN ones included."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def record(self, layer, rows, features, stats, logits):
        for i, r in enumerate(rows.tolist()):
            if (self.calls + r) % 3 == 2:
                logits[i, logits[i].argmax()] = -math.inf
        self.calls += 1


SCRIPTS = {
    "row_dependent": lambda r, n: (n * (r + 1)) % 4 == 3,  # each row its own period
    "one_row_always_wrong": lambda r, n: r == 1,
    "staggered": lambda r, n: (n + r) % 3 == 0,
}


# ---------------------------------------------------------------------------------------- identity with stock
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", IDENTITY_VARIANTS)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_rows_accepting_different_counts_equal_stock(script, variant, dtype):
    stock, ada = (m.to(dtype) for m in _identity_last_layer(variant))
    ids, mask = _left_padded(4)
    ref = _gen(stock, ids, mask, max_new_tokens=12)
    out = _gen(ada, ids, mask, max_new_tokens=12, exit_policy=PerRowDrafts(SCRIPTS[script]), lossless=True,
               max_draft_tokens=3, return_dict_in_generate=True)
    _near_tie_or_equal(stock, ref, out.sequences, mask, ids.shape[1], dtype)
    assert len(set(out.accepted_tokens.tolist())) > 1  # the rows accepted different counts
    assert int(out.accepted_tokens.sum()) < int(out.draft_tokens.sum())  # and some drafts were rolled back
    assert int((out.exit_layers < L).sum()) == int(out.accepted_tokens.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rows_with_mixed_exits_equal_stock_on_every_family(variant, dtype):
    stock, ada = (m.to(dtype) for m in make_pair(variant))
    for rows in (2, 4):
        ids, mask = _left_padded(rows, length=6, seed=rows)
        ref = _gen(stock, ids, mask)
        out = _gen(ada, ids, mask, exit_policy=PerRowMixed(), lossless=True, max_draft_tokens=4,
                   return_dict_in_generate=True)
        _near_tie_or_equal(stock, ref, out.sequences, mask, ids.shape[1], dtype)
        assert int(out.draft_tokens.sum()) > 0


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_sliding", "gemma3_text"])
def test_eos_in_one_row_mid_way(variant):
    stock, ada = _identity_last_layer(variant)
    ids, mask = _left_padded(3)
    free = _gen(stock, ids, mask)
    eos = int(free[1, ids.shape[1] + 2])  # row 1 stops at its 3rd token; the others go on (or stop there too)
    ref = _gen(stock, ids, mask, eos_token_id=eos)
    out = _gen(ada, ids, mask, eos_token_id=eos, exit_policy=PerRowDrafts(SCRIPTS["row_dependent"]),
               lossless=True, max_draft_tokens=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert ref.shape[1] > ids.shape[1] + 3 and int(ref[1, -1]) == 0  # row 1 was padded after its EOS
    # a finished row left the batch: its drafts stopped there
    assert int(out.draft_tokens[1]) < int(out.draft_tokens.max())


@pytest.mark.parametrize("n", range(1, 8))
def test_max_new_tokens_one_to_n(n):
    stock, ada = _identity_last_layer("mistral_sliding")
    ids, mask = _left_padded(4)
    ref = _gen(stock, ids, mask, max_new_tokens=n)
    out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=PerRowDrafts(SCRIPTS["staggered"]), lossless=True,
               max_draft_tokens=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and out.sequences.shape[1] == ids.shape[1] + n
    assert out.exit_layers.shape == (4, n)


def test_a_criterion_without_eos_runs_rows_to_the_batchs_length():
    """A user criterion (no EOS) that fires for one row first: stock runs that row on to the batch's end."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, lengths):
            self.lengths = lengths

        def __call__(self, input_ids, scores, **kwargs):
            # per row of the call: stops once the row holds its own `lengths` (by its first prompt token)
            first = input_ids[:, 0].tolist()
            return torch.tensor([input_ids.shape[1] >= self.lengths[t] for t in first])

    stock, ada = _identity_last_layer("llama_gqa")
    ids, mask = _left_padded(3)
    lengths = {int(ids[0, 0]): ids.shape[1] + 3, int(ids[1, 0]): ids.shape[1] + 6, int(ids[2, 0]): ids.shape[1] + 2}
    ref = _gen(stock, ids, mask, max_new_tokens=12, eos_token_id=None,
               stopping_criteria=StoppingCriteriaList([StopAfter(lengths)]))
    out = _gen(ada, ids, mask, max_new_tokens=12, eos_token_id=None,
               stopping_criteria=StoppingCriteriaList([StopAfter(lengths)]),
               exit_policy=PerRowDrafts(SCRIPTS["row_dependent"]), lossless=True, max_draft_tokens=4)
    assert ref.shape[1] == ids.shape[1] + 6 and torch.equal(out, ref)


# ---------------------------------------------------------------------------------------- the batch is one decode
def _forwards(model, ids, mask, policy, **kw):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = _gen(model, ids, mask, exit_policy=policy, lossless=True, return_dict_in_generate=True, **kw)
    finally:
        handle.remove()
    return len(calls), out


def test_a_batch_decodes_in_lockstep_not_row_after_row():
    """Four copies of a prompt take as many forwards as one (the rows share every step); distinct rows with
    different accept counts take no more forwards than the slowest row alone."""
    stock, ada = _identity_last_layer("llama_gqa")
    ids, mask = _left_padded(4)
    script = SCRIPTS["row_dependent"]
    one, _ = _forwards(ada, ids[:1], mask[:1], PerRowDrafts(lambda r, n: script(0, n)), max_draft_tokens=3)
    four, out = _forwards(ada, ids[:1].expand(4, -1), mask[:1].expand(4, -1),
                          PerRowDrafts(lambda r, n: script(0, n)), max_draft_tokens=3)
    assert four == one and out.accepted_tokens.tolist() == [out.accepted_tokens[0].item()] * 4
    batched, _ = _forwards(ada, ids, mask, PerRowDrafts(script), max_draft_tokens=3)
    alone = [_forwards(ada, ids[r:r + 1], mask[r:r + 1], PerRowDrafts(lambda _, n, r=r: script(r, n)),
                       max_draft_tokens=3)[0] for r in range(4)]
    assert batched < sum(alone)


# ---------------------------------------------------------------------------------------- the cache after rollbacks
@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_sliding", "qwen2_sliding", "gemma3_text",
                                     "opt_350m_layout"])
def test_each_rows_cache_after_every_rollback_is_a_stock_recompute(variant, monkeypatch):
    """After every rollback, each row's real positions (a contiguous suffix of the cache, the mask zero before
    it) hold the K/V of a stock no-cache recompute of that row's verified text (sliding layers: its window), and
    its next position id continues from its own length."""
    # (post-LN OPT has no identity layer, but its tiny random lens agrees with full depth: the same script)
    stock, ada = _identity_last_layer(variant) if variant != "opt_350m_layout" else make_pair(variant)
    policy = PerRowDrafts(SCRIPTS["row_dependent"])
    ids, mask = _left_padded(4)
    checked, shifted = [0], [0]
    original = lockstep.LockstepBatch.roll_back

    def roll_back(self, remove):
        shifted[0] += len(set(remove)) > 1
        original(self, remove)
        for b, row in enumerate(self.rows):
            _assert_row_cache(stock, self, b, row, mask[row.index])
            checked[0] += 1

    monkeypatch.setattr(lockstep.LockstepBatch, "roll_back", roll_back)
    ref = _gen(stock, ids, mask, max_new_tokens=11)
    out = _gen(ada, ids, mask, max_new_tokens=11, exit_policy=policy, lossless=True, max_draft_tokens=4)
    assert torch.equal(out, ref)
    assert checked[0] > 8 and shifted[0] > 0  # rows were rolled back by different counts


def _assert_row_cache(stock, decoding, b, row, prompt_mask):
    real = torch.cat([prompt_mask.bool(), torch.ones(row.n - row.prompt_length, dtype=torch.bool)])
    text = row.seq[0][real][:-1]  # the verified text but its last token (fed next)
    n_real = text.shape[0]
    cache = decoding.cache
    assert cache.pending_hidden is None
    if decoding.mask is not None:
        row_mask = decoding.mask[b, :decoding.length]
        assert row_mask[-n_real:].all() and not row_mask[:-n_real].any(), row_mask.tolist()
    else:
        assert decoding.length == n_real
    assert int(decoding.next_pos[b, 0]) == n_real
    with torch.no_grad():
        from adainfer_hf.compat import output_cache
        want = output_cache(stock(text[None], use_cache=True))
    for i, (got, ref) in enumerate(zip(cache.layers, want.layers, strict=True)):
        m = min(ref.keys.shape[-2], got.keys.shape[-2], n_real)
        torch.testing.assert_close(got.keys[b, :, -m:], ref.keys[0, :, -m:], atol=1e-5, rtol=1e-4,
                                   msg=f"layer {i} keys")
        torch.testing.assert_close(got.values[b, :, -m:], ref.values[0, :, -m:], atol=1e-5, rtol=1e-4,
                                   msg=f"layer {i} values")
        assert got.get_seq_length() == decoding.length


class _FiresFor(ExitPolicy):
    """One check after layer L - 1 that fires for the rows `fires(rows)` says; counts the steps that checked."""

    features = ("gap", "top_prob")

    def __init__(self, fires):
        self.check_layers, self.min_layer, self.fires, self.calls = (L - 1,), 1, fires, 0

    def decide(self, features, layer, rows, state=None):
        self.calls += 1
        return self.fires(rows)


@pytest.mark.parametrize("together", [False, True])
def test_a_batch_whose_checks_rarely_fire_together_stops_checking(together):
    """A batch drafts only when every row fired: when it did on fewer than BACKOFF_RATE of BACKOFF_AFTER checked
    steps, the checks stop for the rest of the call (checks that fire together keep running); the text is the
    stock text either way."""
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left", batch_size=2)
    n = 3 * lockstep.BACKOFF_AFTER
    policy = _FiresFor((lambda rows: torch.ones_like(rows, dtype=torch.bool)) if together else (lambda rows: rows == 0))
    ref = _gen(stock, ids, mask, max_new_tokens=n)
    out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=policy, lossless=True, max_draft_tokens=2,
               return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    if together:
        assert policy.calls > lockstep.BACKOFF_AFTER and int(out.draft_tokens.sum()) > 0
    else:
        assert policy.calls == lockstep.BACKOFF_AFTER and int(out.draft_tokens.sum()) == 0


def test_one_row_keeps_checking_however_rarely_it_drafts():
    """One row keeps the rule its drafting objective chose: no back-off, every step before the cap checks."""
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none", batch_size=1)
    n = 3 * lockstep.BACKOFF_AFTER
    policy = _FiresFor(lambda rows: torch.zeros_like(rows, dtype=torch.bool))  # never drafts
    out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=policy, lossless=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=n))
    assert policy.calls == n - 2  # every decode step checked but the last (the first token is the prefill's; a
    # draft for the last token could not be verified within the budget)
