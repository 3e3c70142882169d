"""Lossless sampling (`generate(..., lossless=True, do_sample=True)`): the speculative-sampling acceptance keeps the
stock distribution. With drafts whose distribution is the target's (q == p), no acceptance draw happens and the
seeded output is the stock sampler's token for token; with drafts from an early layer (q != p), the distribution
of the first token after a draft matches the exact stock distribution (from the stock softmax, not sampling)
under a chi-square test, and the test has power: accepting every draft fails it."""

from __future__ import annotations

import pytest
import torch

from adainfer_hf import AdaInferLlamaForCausalLM, ScriptedExit
from adainfer_hf import tiny_models as tiny
from adainfer_hf.runtime import lockstep

stats = pytest.importorskip("scipy.stats")

L, VOCAB = 4, 12
FALSE_ALARM = 1e-4  # the chi-square test's false-alarm rate (its threshold is the chi2 quantile at 1 - this)
N = 1200  # lossless samples


def _pair(identity_last_layer=False, sharpness=8.0):
    """A stock Llama with a 12-token vocabulary (no EOS, so every row runs its budget) and its AdaInfer twin. The
    LM head is scaled up so the distributions are far from uniform and an early layer's lens differs from the
    full-depth one (power for the test); `identity_last_layer` zeroes the last layer's residual writes, so the
    lens after layer L-1 is the full-depth distribution (q == p)."""
    stock = tiny.stock_model("llama_gqa", vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    with torch.no_grad():
        stock.lm_head.weight.mul_(sharpness)
        if identity_last_layer:
            stock.model.layers[-1].self_attn.o_proj.weight.zero_()
            stock.model.layers[-1].mlp.down_proj.weight.zero_()
    stock.generation_config.eos_token_id = None
    ada = AdaInferLlamaForCausalLM(stock.config).eval()
    ada.load_state_dict(stock.state_dict())
    ada.generation_config.eos_token_id = None
    return stock, ada


def _prompt(rows=1):
    ids = torch.tensor([[5, 9, 3, 7, 4]]).expand(rows, -1).contiguous()
    return ids, torch.ones_like(ids)


def _sample(model, ids, mask, seed, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=True, pad_token_id=0, top_k=0, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drafts_with_the_target_distribution_give_the_stock_samples_exactly(seed):
    """q == p (exit at L-1 on a model whose layer L adds nothing): every draft is accepted without a random draw
    and each token takes one multinomial draw from the same distribution as stock's, so the random stream is
    consumed as stock consumes it."""
    stock, ada = _pair(identity_last_layer=True)
    ids, mask = _prompt()
    ref = _sample(stock, ids, mask, seed, max_new_tokens=12)
    out = _sample(ada, ids, mask, seed, max_new_tokens=12, exit_policy=ScriptedExit(L - 1), lossless=True,
                  max_draft_tokens=3, return_dict_in_generate=True)
    assert int(out.draft_tokens[0]) > 0 and int(out.accepted_tokens[0]) == int(out.draft_tokens[0])
    assert torch.equal(out.sequences, ref)


def _stock_second_token_distribution(stock, ids):
    """The exact stock distribution of the 2nd new token: sum over t1 of p(t1 | prompt) p(t2 | prompt, t1)."""
    with torch.no_grad():
        first = torch.softmax(stock(ids[:1]).logits[0, -1].double(), -1)
        prefixes = torch.cat([ids[:1].expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        second = torch.softmax(stock(prefixes).logits[:, -1].double(), -1)
    return first @ second


def _chi_square(counts, expected_probs):
    """Pearson's statistic and the threshold for FALSE_ALARM (cells expected below 5 pooled into one)."""
    expected = expected_probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum().view(1)]) if small.any() else expected
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return statistic, float(stats.chi2.ppf(1 - FALSE_ALARM, obs.numel() - 1))


def _second_tokens(ada, seed):
    ids, mask = _prompt(N)
    out = _sample(ada, ids, mask, seed, max_new_tokens=3, exit_policy=ScriptedExit(1), lossless=True,
                  max_draft_tokens=1, return_dict_in_generate=True)
    # token 1 comes from the prefill; token 2 is the first drafted one (layer 1), verified at full depth
    assert out.draft_tokens.tolist() == [1] * N
    return torch.bincount(out.sequences[:, ids.shape[1] + 1], minlength=VOCAB).double(), out


def test_drafts_from_an_early_layer_keep_the_stock_distribution():
    stock, ada = _pair()
    ids, _ = _prompt()
    want = _stock_second_token_distribution(stock, ids)
    counts, out = _second_tokens(ada, seed=7)
    statistic, threshold = _chi_square(counts, want)
    assert statistic < threshold, (statistic, threshold, counts.tolist(), (want * N).tolist())
    assert 0 < int(out.accepted_tokens.sum()) < N  # both outcomes of the acceptance rule happened


def test_the_distribution_test_has_power_against_accepting_every_draft(monkeypatch):
    """Accepting every draft samples token 2 from the layer-1 lens: the same test rejects it."""
    stock, ada = _pair()
    ids, _ = _prompt()
    want = _stock_second_token_distribution(stock, ids)
    monkeypatch.setattr(lockstep._Row, "_accept", lambda self, scores, draft, q: (True, draft))
    counts, out = _second_tokens(ada, seed=7)
    assert int(out.accepted_tokens.sum()) == N
    statistic, threshold = _chi_square(counts, want)
    assert statistic > threshold, (statistic, threshold)
