"""A property-based fuzzer: every exit pattern, on every family, against a stock reference.

Hypothesis draws a family and a tiny config (layers, heads, KV heads, sliding window, tied head), a batch with or
without left padding (what `generate` takes; right padding is covered by the forward tests), a per-row, per-step exit plan (all-exit and never-exit steps included), a cache option, a check
vocabulary or none, a gate or none, the dtype, and greedy decoding, seeded sampling or beam search. Each generated
step's raw logits must equal the stock model's, computed independently of the exit loop:

- `propagate` (the default) and a plain `DynamicCache`: one stock forward over the whole generated text, hooked so
  that a position's hidden state passes unchanged through every layer deeper than its recorded exit (which is what
  state propagation writes into the deeper layers' caches);
- `exact`: the stock model's dense no-cache forward over each step's prefix, with the lens at the step's exit layer
  at the last position;
- no cache (`use_cache=False`): each step's prefix through the stock model with the whole row frozen after its exit
  layer (the stock model cut to k layers).

The recorded exit layers must be the plan's (after the gate), and every layer's cache must hold every position.
Beam search is checked against stock `generate` when nothing exits, and for consistency when rows exit (a beam's
history moves between rows, so there is no per-row reference).

Profiles: `ci` (the default, about 2 minutes on 2 cores) and `long` (`ADAINFER_FUZZ=long`, run before closing an
issue that touches the loop). A failure hypothesis finds is minimised, fixed and kept as a regular test.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny_models import VARIANTS  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from adainfer_hf import compat  # noqa: E402
from adainfer_hf import tiny_models as tiny  # noqa: E402
from adainfer_hf.cache.base import cache_layer_lengths  # noqa: E402
from adainfer_hf.policy.base import ExitPolicy  # noqa: E402
from adainfer_hf.policy.gate import LinearGate  # noqa: E402

settings.register_profile("ci", max_examples=400, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=int(os.environ.get("ADAINFER_FUZZ_EXAMPLES", 1500)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("ADAINFER_FUZZ", "ci")

SLIDING = ("qwen2_sliding", "mistral_sliding", "gemma3_text")
NO_KV_HEADS = ("opt_pre_ln", "opt_post_ln", "opt_350m_layout")


class PlanExit(ExitPolicy):
    """Exits row r at step s after the first checked layer >= `plan[s][r]` (>= L: never); the step is counted by
    `begin_run`, once per forward."""

    def __init__(self, plan, check_vocabulary=None, gate=None):
        self.features = ("gap", "top_prob")
        self.min_layer = 1
        self.check_layers = None
        self.check_vocabulary = check_vocabulary
        self.gate = gate
        self.plan = plan
        self.step = -1
        self.beams = 1  # beam search: row r is a beam of batch row r // beams

    def begin_run(self, batch_size):
        self.step += 1
        return None

    def decide(self, features, layer, rows, state=None):
        target = torch.tensor(self.plan[min(self.step, len(self.plan) - 1)])[rows.cpu() // self.beams]
        return (target <= layer).to(features.device)


# ---------------------------------------------------------------------- the stock references
def _position_ids(mask):
    """What `generate` passes: positions counted over real tokens (pads at 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _hooked_logits(stock, ids, mask, exit_at):
    """Stock logits [B, T, V] of `ids` with position (b, t)'s hidden state frozen after layer `exit_at[b, t]`
    (1-based; >= L: runs every layer): a forward hook passes the frozen positions' inputs through each deeper
    layer unchanged, so the deeper layers' K/V of those positions come from the frozen state."""
    layers = stock.model.decoder.layers if hasattr(stock.model, "decoder") else stock.model.layers
    handles = []
    for index, layer in enumerate(layers, start=1):
        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            frozen = (exit_at < index).to(out.device)[..., None]
            new = torch.where(frozen, hidden_in, out)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return stock(ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def _reference_logits(stock, out, ids, mask, exit_cache):
    """Per generated step, the stock logits [B, V] that step's output must equal."""
    exits, P, N = out.exit_layers, ids.shape[1], out.exit_layers.shape[1]
    B, L = ids.shape[0], stock.config.num_hidden_layers
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(B, N, dtype=mask.dtype)], 1)
    if exit_cache in ("propagate", "dynamic"):
        per_position = torch.cat([exits[:, :1].expand(B, P), exits[:, 1:]], 1)  # input position -> its exit
        logits = _hooked_logits(stock, seq[:, : P + N - 1], full_mask[:, : P + N - 1], per_position)
        return [logits[:, P - 1 + s] for s in range(N)]
    refs = []
    for s in range(N):
        prefix, pmask = seq[:, : P + s], full_mask[:, : P + s]
        if exit_cache == "exact":  # dense prefix, the lens at the step's exit layer at the last position
            exit_at = torch.full(prefix.shape, L)
            exit_at[:, -1] = exits[:, s]
        else:  # no cache: the whole row is cut after its exit layer
            exit_at = exits[:, s : s + 1].expand(prefix.shape)
        refs.append(_hooked_logits(stock, prefix, pmask, exit_at)[:, -1])
    return refs


def _expected_exits(plan, gate_pass, L, n_steps):
    """The exit layer of each (row, step): the first layer >= the plan's where the gate passes (L: none)."""
    rows = []
    for s in range(n_steps):
        step = plan[min(s, len(plan) - 1)]
        rows.append([next((k for k in range(max(t, 1), L) if gate_pass[k - 1]), L) for t in step])
    return torch.tensor(rows).T


# ---------------------------------------------------------------------- what hypothesis draws
@st.composite
def cases(draw):
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    layers = draw(st.integers(2, 5))
    overrides = dict(num_hidden_layers=layers, tie_word_embeddings=draw(st.booleans()))
    if variant in NO_KV_HEADS:
        overrides["num_attention_heads"] = draw(st.sampled_from([2, 4]))
    else:
        heads, kv = draw(st.sampled_from([(4, 2), (4, 1), (4, 4), (2, 1)]))
        overrides.update(num_attention_heads=heads, num_key_value_heads=kv)
    if variant in SLIDING:
        overrides["sliding_window"] = draw(st.integers(2, 4))
    overrides["init_std" if variant in NO_KV_HEADS else "initializer_range"] = 0.2
    batch = draw(st.integers(1, 3))
    new_tokens = draw(st.integers(1, 4))
    layer_choice = st.integers(1, layers)  # layers: never exit
    plan = draw(st.lists(st.lists(layer_choice, min_size=batch, max_size=batch), min_size=new_tokens,
                         max_size=new_tokens))
    return dict(
        variant=variant, overrides=overrides, batch=batch, new_tokens=new_tokens, plan=plan,
        length=draw(st.integers(2, 7)), padding=draw(st.sampled_from(["left", "none"])),  # (generate takes left padding)
        exit_cache=draw(st.sampled_from(["propagate", "exact", "dynamic", "none"])),
        vocabulary=draw(st.one_of(st.none(), st.integers(1, 10**6))),
        gate=draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=layers, max_size=layers))),
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        mode=draw(st.sampled_from(["greedy", "greedy", "sample", "beam"])),
        seed=draw(st.integers(0, 3)),
    )


def _build(case):
    stock = tiny.stock_model(case["variant"], seed=case["seed"], **case["overrides"])
    ada = VARIANTS[case["variant"]][1](stock.config).eval()
    ada.load_state_dict(stock.state_dict())
    dtype = getattr(torch, case["dtype"])
    return stock.to(dtype), ada.to(dtype)


def _inputs(case, vocab_size):
    g = torch.Generator().manual_seed(case["seed"] + 7)
    B, T = case["batch"], case["length"]
    ids = torch.randint(3, vocab_size, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if case["padding"] != "none" and B > 1 and T > 1:
        pads = int(torch.randint(1, T, (1,), generator=g))
        if case["padding"] == "left":
            mask[-1, :pads] = 0
        else:
            mask[-1, T - pads:] = 0
        ids = ids.masked_fill(mask == 0, stock_pad(case))
    return ids, mask


def stock_pad(case):
    return 1 if case["variant"] in NO_KV_HEADS else 0


def _policy(case, L, vocab_size):
    vocabulary = None
    if case["vocabulary"] is not None:
        g = torch.Generator().manual_seed(case["vocabulary"])
        vocabulary = tuple(sorted(torch.randperm(vocab_size, generator=g)[: 10 + case["vocabulary"] % 50].tolist()))
    gate = gate_pass = None
    if case["gate"] is not None:
        gate_pass = case["gate"][: L - 1] + [True]
        gated = list(range(1, L))
        hidden = case["overrides"].get("hidden_size", 32)
        threshold = [float("-inf") if gate_pass[k - 1] else float("inf") for k in gated]
        gate = LinearGate(gated, torch.zeros(len(gated), hidden).numpy(), [0.0] * len(gated), threshold)
    return PlanExit(case["plan"], vocabulary, gate), vocabulary, gate_pass or [True] * L


def _tolerance(case):
    return (2e-5, 1e-5) if case["dtype"] == "float32" else (0.1, 0.05)


@settings(settings.get_profile(PROFILE))
@given(case=cases())
def test_every_exit_pattern_matches_the_stock_reference(case):
    for key in ("variant", "exit_cache", "mode", "dtype"):  # the mix, shown by --hypothesis-show-statistics
        event(f"{key}={case[key]}")
    stock, ada = _build(case)
    L, V = stock.config.num_hidden_layers, stock.config.vocab_size
    ids, mask = _inputs(case, V)
    policy, vocabulary, gate_pass = _policy(case, L, V)
    kw = dict(attention_mask=mask, max_new_tokens=case["new_tokens"], min_new_tokens=case["new_tokens"],
              pad_token_id=stock_pad(case), return_dict_in_generate=True, output_logits=True, top_k=None)
    if case["mode"] == "sample":
        kw.update(do_sample=True, temperature=1.0, top_p=1.0)
    elif case["mode"] == "beam":
        kw.update(do_sample=False, num_beams=2, num_return_sequences=1)
        policy.beams = 2
    else:
        kw.update(do_sample=False)
    exit_cache = case["exit_cache"]
    ours_kw = dict(kw, exit_policy=policy)
    if exit_cache == "none":
        ours_kw["use_cache"] = False
    elif exit_cache == "dynamic":
        ours_kw["cache"] = DynamicCache(config=ada.config)
    else:
        ours_kw["exit_cache"] = exit_cache
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        out = ada.generate(ids, **ours_kw)
    if case["mode"] == "beam":
        never = all(k >= L for step in case["plan"] for k in step)
        if never:
            with torch.no_grad():
                ref = stock.generate(ids, **kw)
            assert torch.equal(out.sequences, ref.sequences)
        assert out.sequences.shape[0] == ids.shape[0]
        return
    expected = _expected_exits(case["plan"], gate_pass, L, case["new_tokens"])
    assert torch.equal(out.exit_layers, expected), (out.exit_layers, expected)
    atol, rtol = _tolerance(case)
    refs = _reference_logits(stock, out, ids, mask, exit_cache)
    for s, ref in enumerate(refs):
        ref = ref.float()
        if vocabulary is not None:  # an exited row's logits are the shortlist's, -inf elsewhere
            outside = torch.ones(V, dtype=torch.bool)
            outside[list(vocabulary)] = False
            exited = (out.exit_layers[:, s] < L)[:, None]
            ref = ref.masked_fill(exited & outside[None, :], float("-inf"))
        got = out.logits[s].float()[:, :V]
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), s
        finite = torch.isfinite(ref)
        torch.testing.assert_close(got[finite], ref[finite], atol=atol, rtol=rtol, msg=f"step {s}")
        if case["mode"] == "greedy":
            token = out.sequences[:, ids.shape[1] + s]
            eos = stock.generation_config.eos_token_id
            ref = ref.clone()
            ref[:, [eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")  # (min_new_tokens)
            top2 = ref.topk(2, dim=-1).values
            near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * atol
            assert bool(((token == ref.argmax(-1)) | near_tie).all()), s
    if exit_cache in ("propagate", "dynamic", "exact"):
        lengths = cache_layer_lengths(compat.output_cache(out))
        total = out.sequences.shape[1] - 1
        if exit_cache == "exact":  # deeper layers may still owe positions: never more than the text, all of layer 1
            assert lengths[0] == total and all(n <= total for n in lengths if n is not None)
        else:
            assert all(n == total for n in lengths if n is not None), lengths
