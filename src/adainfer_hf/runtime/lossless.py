"""Lossless early exit in `generate`: exits become draft tokens that the deeper layers verify, so the text is the
stock model's (greedy: token for token; sampling: in distribution).

`generate(..., lossless=True)` hands `lossless_decode` to transformers' `generate` as its decoding callable
(`custom_generate=`), after transformers prepared the generation config, the logits processors, the stopping
criteria, the attention mask and the position ids. Per row (see "Batches" below), with the verified sequence
`x_0 .. x_m` (`x_m` not fed yet; feeding position j predicts token j + 1):

- **Prefill** at full depth, no exits: the first new token is the stock model's.
- **Draft**: feed the last token through the exit loop. If the policy's check fires after layer `l < L`, the exit
  logits, after the logits processors, give the draft `d` (argmax; a sample of that distribution `q` when
  sampling) and the position owes layers `l+1 .. L` in the exact cache (`cache.draft.DraftExitCache`). Drafts are
  fed on, at most `max_draft_tokens` in a row and never more than the tokens still allowed minus one.
- **Verify**: a token that runs every layer (its checks do not fire, or the cap was reached and it runs without a
  policy) catches every owed position up layer by layer in the same calls (the exact cache's catch-up); at the last
  layer their outputs go through the final norm and the LM head together with its own (`runtime.output`), so one
  forward gives the full-depth logits of every draft position and of the current one.
- **Accept**: position j's full-depth logits, after the processors (on the verified prefix), give the stock
  choice for token j + 1. Greedy: accept the draft while it equals the argmax; at the first mismatch keep the
  stock token and discard every later draft. Sampling (speculative sampling, Leviathan et al. 2023): with the
  exit's processed distribution `q` as the draft and the full-depth processed distribution `p` as the target,
  accept `d` with probability `min(1, p(d) / q(d))` (no draw when `p(d) >= q(d)` up to 4 ulp); on a rejection sample
  from `normalise(max(0, p - q))`. When every draft is accepted the current position gives one more token from `p`
  (argmax when greedy). Each token so produced has exactly the stock distribution given its prefix.
- **Roll back**: every layer's cache is cropped to the verified prefix (`DraftExitCache.crop`) and decoding goes
  on from the last verified token.

Every emitted token goes through the stopping criteria (EOS, `max_length`, user criteria) one at a time, and a
streamer receives verified tokens only (one `put` per token). With `return_dict_in_generate` the output carries
the full-depth scores / logits of the verified tokens (what stock generation scores), `exit_layers` [B, new
tokens] (the layer whose logits chose the token: the draft's exit layer for an accepted draft, L otherwise; 0 after
a row finished), and per-row `draft_tokens` / `accepted_tokens`.

**Batches** (`runtime.lockstep.LockstepBatch`): the rows decode in lockstep in one `DraftExitCache`, each feeding
one token per step (its last verified token or its latest draft). The exact cache runs the batch at one depth per
step (a row whose check fired keeps computing until every row's has), so a step is a *draft step* when every row's
check fired (each row's draft comes from its own exit layer's logits) and a *verification* of every row otherwise,
or when some row's cap is reached: every row then has the same P drafts in flight, caught up and verified in the one
forward, whose output is every row's full-depth logits (`VerifyingStrategy`). Rows accept different counts;
`LockstepBatch.roll_back` crops the cache to the row that keeps the most and moves each other row's rejected
positions to its left, as padding the mask zeroes (one per-row rotation of every layer's K/V), so a row's real
positions stay a contiguous suffix of the cache: its position ids continue from its own length, and sliding-window
layers, whose recorded past (see `DraftExitCache`) still holds every position fed since the last rollback, keep
exactly its last W real tokens after the rotation and the window trim (a row never drops more than the P + 1
positions fed since then). Finished rows leave the batch (`batch_select_indices`); the output is padded as stock
`generate` pads it. Without an EOS criterion a row whose criteria fired goes on, criteria off, until every row's
did, and every row ends at the longest such length (as stock). A streamer needs a batch of one (as transformers'
text streamers do).
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from .. import compat
from .lockstep import LockstepBatch

__all__ = ["lossless_decode", "lossless_generate", "resolve_lossless", "resolve_max_draft_tokens"]

# model kwargs `generate` prepares that the loop replaces with its own (per row) or does not need
_OWN_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "exit_recorder", "exit_policy",
               *compat.CACHE_ARG_NAMES)


def _row_inputs(model_kwargs: dict, batch: int):
    """The attention mask and position ids `generate` prepared (None where it prepared none)."""
    unexpected = sorted(k for k, v in model_kwargs.items() if k not in _OWN_KWARGS and v is not None)
    if unexpected:
        raise ValueError(f"generate(lossless=True) does not pass model inputs {unexpected} to the model; "
                         "pass them without lossless=True.")
    mask, positions = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
    if positions is None and mask is not None:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if positions is not None and positions.shape[0] != batch:
        positions = positions.expand(batch, -1)
    return mask, positions


def _stack(rows: list, per_row, width: int, fill, dtype, device):
    """`[B, width]` from each row's list (padded with `fill`)."""
    out = torch.full((len(rows), width), fill, dtype=dtype, device=device)
    for b, row in enumerate(rows):
        values = per_row(row)
        if len(values):
            out[b, :len(values)] = torch.as_tensor(values, dtype=dtype, device=device)
    return out


def _per_step(rows: list, name: str, width: int):
    """The scores / logits tuples of stock generation (one `[B, V]` per step; zeros where a row had finished)."""
    if not getattr(rows[0], name):
        return None
    steps = []
    for t in range(width):
        ref = next(getattr(r, name)[t] for r in rows if len(getattr(r, name)) > t)
        steps.append(torch.cat([getattr(r, name)[t] if len(getattr(r, name)) > t else torch.zeros_like(ref)
                                for r in rows], 0))
    return tuple(steps)


def _output(decoding: LockstepBatch, input_ids, pad_token, generation_config):
    rows = decoding.every_row
    width = max(r.new_tokens for r in rows)
    fill = int(pad_token) if pad_token is not None else 0
    tokens = decoding.loop.tokens[:, :input_ids.shape[1] + width].clone()
    for b, row in enumerate(rows):
        tokens[b, row.n:] = fill
    if not generation_config.return_dict_in_generate:
        return tokens
    out = compat.GenerateDecoderOnlyOutput(
        sequences=tokens, scores=_per_step(rows, "scores", width), logits=_per_step(rows, "logits", width),
        **{compat.GENERATE_CACHE_FIELD: decoding.cache if len(rows) == 1 else None})
    out["exit_layers"] = _stack(rows, lambda r: r.layers, width, 0, torch.long, "cpu")
    out["draft_tokens"] = torch.tensor([r.drafted for r in rows], dtype=torch.long)
    out["accepted_tokens"] = torch.tensor([r.accepted for r in rows], dtype=torch.long)
    return out


def lossless_decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                    streamer=None, *, lossless_policy=None, lossless_num_layers: int = 0,
                    lossless_max_draft_tokens: int = 8, **model_kwargs):
    """The decoding method of `generate(..., lossless=True)` (see the module docstring for the rule).

    Called by transformers' `generate` as its `custom_generate` callable, with the arguments of its own decoding
    methods; `generate(..., lossless=True)` binds the keyword-only ones.

    Args:
        lossless_policy: the `exit_policy=` value of the draft steps (the checked policy).
        lossless_num_layers (`int`): the model's decoder layer count L.
        lossless_max_draft_tokens (`int`): drafts in a row before a step runs every layer.

    Returns:
        `torch.LongTensor` sequences, or with `return_dict_in_generate` a `GenerateDecoderOnlyOutput` plus
        `exit_layers`, `draft_tokens` and `accepted_tokens` (the cache only at batch size 1: finished rows leave
        the batched cache).
    """
    batch = input_ids.shape[0]
    if streamer is not None and batch > 1:
        raise ValueError(f"generate(lossless=True, streamer=...) needs a batch of one; got {batch} rows.")
    for option in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, option, False):
            raise ValueError(f"generate(lossless=True) does not return per-step internals; got {option}=True.")
    mask, positions = _row_inputs(model_kwargs, batch)
    decoding = LockstepBatch(model, input_ids, mask, positions, policy=lossless_policy,
                             num_layers=lossless_num_layers, max_draft_tokens=lossless_max_draft_tokens,
                             logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                             generation_config=generation_config, streamer=streamer)
    decoding.prefill()
    decoding.run()
    if streamer is not None:
        streamer.end()
    pad_token, _ = compat.special_token_tensors(generation_config)
    return _output(decoding, input_ids, pad_token, generation_config)


def resolve_lossless(policy, lossless, exit_cache, max_draft_tokens) -> bool:
    """Whether a `generate` call decodes losslessly: `lossless` when given (a bool), else the policy's `drafting`
    (an artifact trained for drafting) unless the call names an `exit_cache`; never without a policy (nothing
    drafts: the stock path). `ValueError` naming a bad value, or `lossless=True` with `exit_cache="propagate"`."""
    if lossless is not None and not isinstance(lossless, bool):
        raise ValueError(f"lossless must be True, False or None (the classifier's choice); got {lossless!r}.")
    if max_draft_tokens is not None and (isinstance(max_draft_tokens, bool) or not isinstance(max_draft_tokens, int)
                                         or max_draft_tokens < 1):
        raise ValueError(f"max_draft_tokens must be an int >= 1 or None (the classifier's cap); got "
                         f"{max_draft_tokens!r}.")
    if lossless is None:
        lossless = exit_cache is None and getattr(policy, "drafting", False) is True
    if lossless and exit_cache == "propagate":
        raise ValueError("generate(lossless=True) verifies drafts with the exact cache; exit_cache='propagate' "
                         "cannot be verified. Pass exit_cache='exact' (or leave it out), or lossless=False.")
    return lossless and policy is not None


def resolve_max_draft_tokens(policy, max_draft_tokens: int | None) -> int:
    """The draft cap of a lossless call: `max_draft_tokens` when given, else the one a drafting artifact chose
    (`calibration["drafting"]["max_draft_tokens"]`), else 8."""
    if max_draft_tokens is not None:
        return max_draft_tokens
    record = getattr(policy, "calibration", None)
    cap = record.get("drafting", {}).get("max_draft_tokens") if isinstance(record, dict) else None
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return cap
    return 8


def lossless_generate(model, generate, policy, cache, max_draft_tokens: int, args, kwargs):
    """Runs `generate` (the stock `GenerationMixin.generate` of `model`) with `lossless_decode` as its decoding
    callable; refuses, by name, the options it cannot run.

    Args:
        policy: the checked `exit_policy=` value of the draft steps.
        cache: the cache argument the caller was given (must be None: each row gets its own `DraftExitCache`).
    """
    gen_config = kwargs.get("generation_config") or model.generation_config
    if cache is not None:
        raise ValueError(f"generate(lossless=True) builds one DraftExitCache per row; got a cache argument "
                         f"({type(cache).__name__}). Leave it out.")
    setting = {name: kwargs.get(name, getattr(gen_config, name, None))
               for name in ("num_beams", "use_cache", "custom_generate", "penalty_alpha", "dola_layers")}
    if (setting["num_beams"] or 1) > 1:
        raise ValueError(f"generate(lossless=True) does not support beam search; got num_beams="
                         f"{setting['num_beams']}. Use greedy or sampling, or lossless=False.")
    if setting["use_cache"] is False:
        raise ValueError("generate(lossless=True) verifies drafts in the KV cache; got use_cache=False.")
    for name in ("custom_generate", "penalty_alpha", "dola_layers"):
        if setting[name] is not None:
            raise ValueError(f"generate(lossless=True) runs its own decoding loop; got {name}={setting[name]!r}.")
    kwargs.pop("exit_policy", None)
    _stop_strings_as_criterion(gen_config, kwargs)
    decode = functools.partial(lossless_decode, lossless_policy=policy,
                               lossless_num_layers=model.exit_head.spec.num_layers(model),
                               lossless_max_draft_tokens=max_draft_tokens, streamer=kwargs.get("streamer"))
    return generate(*args, custom_generate=decode, **kwargs)


def _stop_strings_as_criterion(gen_config, kwargs) -> None:
    """`stop_strings` as a user stopping criterion: with a `custom_generate` callable, transformers' `generate`
    drops the `tokenizer=` argument before it builds the stop-string criterion (and then refuses the call), so
    the criterion is built here from the call's tokenizer and the generation config's `stop_strings` cleared."""
    stop = kwargs.pop("stop_strings", getattr(gen_config, "stop_strings", None))
    if stop is None:
        return
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError(f"generate(stop_strings={stop!r}) needs the model's tokenizer: pass tokenizer=...")
    if getattr(gen_config, "stop_strings", None) is not None:
        gen_config = copy.deepcopy(gen_config)
        gen_config.stop_strings = None
        kwargs["generation_config"] = gen_config
    kwargs["stopping_criteria"] = StoppingCriteriaList(
        [*(kwargs.get("stopping_criteria") or []), StopStringCriteria(stop_strings=stop, tokenizer=tokenizer)])
