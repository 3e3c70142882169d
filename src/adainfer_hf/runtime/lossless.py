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
  accept `d` with probability `min(1, p(d) / q(d))` (no random draw when `p(d) >= q(d)`); on a rejection sample
  from `normalise(max(0, p - q))`. When every draft is accepted the current position gives one more token from `p`
  (argmax when greedy). Each token so produced has exactly the stock distribution given its prefix.
- **Roll back**: every layer's cache is cropped to the verified prefix (`DraftExitCache.crop`) and decoding goes
  on from the last verified token.

Every emitted token goes through the stopping criteria (EOS, `max_length`, user criteria) one at a time, and a
streamer receives verified tokens only (one `put` per token). With `return_dict_in_generate` the output carries
the full-depth scores / logits of the verified tokens (what stock generation scores), `exit_layers` [B, new
tokens] (the layer whose logits chose the token: the draft's exit layer for an accepted draft, L otherwise; 0 after
a row finished), and per-row `draft_tokens` / `accepted_tokens`.

**Batches**: rows are decoded one after another, each as a batch of one with its own cache (its left padding and
position ids as `generate` prepared them), because rows accept drafts of different lengths; the output is padded
as stock `generate` pads it. A streamer needs a batch of one (as transformers' text streamers do).
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from .. import compat
from ..cache.draft import DraftExitCache

__all__ = ["lossless_decode", "lossless_generate", "resolve_lossless", "resolve_max_draft_tokens"]

# model kwargs `generate` prepares that the loop replaces with its own (per row) or does not need
_OWN_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "exit_recorder", "exit_policy",
               *compat.CACHE_ARG_NAMES)


class _Loop:
    """What every row of one lossless `generate` call shares: the model, the policy, the prepared processors."""

    def __init__(self, model, policy, num_layers, max_draft_tokens, logits_processor, stopping_criteria,
                 generation_config, streamer):
        self.model, self.policy, self.num_layers = model, policy, num_layers
        self.max_draft_tokens = max_draft_tokens
        self.processors, self.criteria, self.streamer = logits_processor, stopping_criteria, streamer
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = int(generation_config.max_length)
        self.keep_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        self.keep_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)


class _Row:
    """One row's lossless decoding: its verified sequence, its cache, the drafts in flight, what it emitted."""

    def __init__(self, loop: _Loop, ids, mask, position_ids):
        self.loop = loop
        self.seq = ids  # [1, n] verified tokens (the prompt's padding included)
        self.prompt_length = ids.shape[1]
        self.prompt_mask = mask
        self.prompt_positions = position_ids
        # position id of sequence index i >= prompt_length - 1 (left padding shifts it)
        last = int(position_ids[0, -1]) if position_ids is not None else self.prompt_length - 1
        self.offset = last - (self.prompt_length - 1)
        self.cache = DraftExitCache(config=loop.model.config)
        self.drafts: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []  # (token, q, exit layer)
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.layers: list[int] = []
        self.drafted = self.accepted = 0
        self.limit = loop.max_length  # the sequence length this row may reach
        self.use_criteria = True  # False while a finished row continues to the batch's length (no EOS criteria)
        self.done = False

    # ------------------------------------------------------------------ forwards
    def _mask(self, total: int):
        """The 2-D attention mask over `total` positions (None where `generate` dropped an all-ones mask)."""
        if self.prompt_mask is None:
            return None
        extra = total - self.prompt_length
        ones = self.prompt_mask.new_ones((1, extra))
        return torch.cat([self.prompt_mask, ones], 1) if extra > 0 else self.prompt_mask[:, :total]

    def _forward(self, input_ids, position_ids, policy):
        past = self.cache.get_seq_length(0)
        out = self.loop.model(input_ids=input_ids, attention_mask=self._mask(past + input_ids.shape[1]),
                              position_ids=position_ids, cache=self.cache, use_cache=True, exit_policy=policy,
                              logits_to_keep=1, return_dict=True)
        return out.logits[0], int(out.exit_layers[0])

    def prefill(self) -> None:
        """The prompt at full depth (no exits); emits the first token."""
        positions = self.prompt_positions
        logits, _ = self._forward(self.seq, positions, None)
        self._verify(logits)

    def step(self) -> None:
        """Feeds the last token (verified or draft): a draft when it exits, a verification when it runs every
        layer."""
        loop = self.loop
        cap = min(loop.max_draft_tokens, self.limit - self.seq.shape[1] - 1)
        feed = self.drafts[-1][0] if self.drafts else self.seq[0, -1]
        past = self.cache.get_seq_length(0)
        position = torch.tensor([[past + self.offset]], device=self.seq.device)
        policy = loop.policy if len(self.drafts) < cap else None  # None: full depth, catching the drafts up
        logits, layer = self._forward(feed.view(1, 1), position, policy)
        if layer < loop.num_layers:
            self._draft(logits[-1:], layer)
        else:
            self._verify(logits)

    # ------------------------------------------------------------------ drafts and verification
    def _processed(self, prefix, raw):
        return self.loop.processors(prefix, raw.to(self.seq.device, torch.float32))

    def _draft(self, raw, layer: int) -> None:
        prefix = torch.cat([self.seq, torch.stack([d for d, _, _ in self.drafts]).view(1, -1)], 1) \
            if self.drafts else self.seq
        scores = self._processed(prefix, raw)
        if self.loop.do_sample:
            q = torch.softmax(scores, dim=-1)
            token = torch.multinomial(q, num_samples=1)[0, 0]
            self.drafts.append((token, q[0], layer))
        else:
            self.drafts.append((scores.argmax(-1)[0], None, layer))
        self.drafted += 1

    def _verify(self, logits) -> None:
        """`logits` [P + 1, V]: full-depth logits of the P draft positions (their predecessors' positions, i.e.
        predicting each draft) and of the current one. Accepts, corrects or adds one token, then rolls back."""
        drafts, self.drafts = self.drafts, []
        if logits.shape[0] != len(drafts) + 1:
            raise RuntimeError(f"lossless verification got logits for {logits.shape[0]} positions with "
                               f"{len(drafts)} draft(s) in flight; expected {len(drafts) + 1}.")
        for i in range(len(drafts) + 1):
            raw = logits[i:i + 1].to(self.seq.device, torch.float32)
            scores = self._processed(self.seq, raw)
            if i < len(drafts):
                draft, q, layer = drafts[i]
                accepted, token = self._accept(scores, draft, q)
                self.accepted += int(accepted)
                self._emit(token, scores, raw, layer if accepted else self.loop.num_layers)
                if not accepted:
                    break
            else:
                self._emit(self._choose(scores), scores, raw, self.loop.num_layers)
            if self.done:
                break
        # keep the verified prefix: every position but the last token's (fed next)
        self.cache.crop(self.cache.get_seq_length(0) - (self.seq.shape[1] - 1))

    def _choose(self, scores) -> torch.Tensor:
        if self.loop.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0]
        return scores.argmax(-1)[0]

    def _accept(self, scores, draft, q):
        """`(accepted, token)`: greedy, the draft if it is the argmax; sampling, the speculative-sampling rule."""
        if not self.loop.do_sample:
            token = scores.argmax(-1)[0]
            return bool(token == draft), token
        p = torch.softmax(scores, dim=-1)[0]
        p_d, q_d = p[draft], q[draft]
        # (accept without a draw where p(d) >= q(d): with q == p the random stream is the stock sampler's; "==" up
        # to a few rounding steps, since the batched verification computes p in another order than the draft's q
        # and a 1-ulp shortfall would otherwise draw; the bias, <= 4 eps q(d), is below p's own rounding)
        if bool(p_d >= q_d * (1 - 4 * torch.finfo(p.dtype).eps)) or bool(torch.rand((), device=p.device) * q_d < p_d):
            return True, draft
        residual = (p - q).clamp_min(0)
        if not bool(residual.sum() > 0):
            residual = p  # (p and q equal up to rounding: a draw from p is exact)
        return False, torch.multinomial(residual[None], num_samples=1)[0, 0]

    def _emit(self, token, scores, raw, layer: int) -> None:
        loop = self.loop
        self.seq = torch.cat([self.seq, token.view(1, 1).to(self.seq.dtype)], 1)
        self.layers.append(layer)
        if loop.keep_scores:
            self.scores.append(scores)
        if loop.keep_logits:
            self.logits.append(raw)
        if loop.streamer is not None:
            loop.streamer.put(token.view(1).cpu())
        if self.seq.shape[1] >= self.limit:
            self.done = True
        elif self.use_criteria:
            scores_so_far = tuple(self.scores) if loop.keep_scores else None
            self.done = bool(loop.criteria(self.seq, scores_so_far).any())

    def run(self) -> None:
        while not self.done:
            self.step()

    @property
    def new_tokens(self) -> int:
        return self.seq.shape[1] - self.prompt_length


def _row_inputs(model_kwargs: dict, batch: int):
    """Per-row attention masks and position ids from what `generate` prepared (None where it prepared none)."""
    unexpected = sorted(k for k, v in model_kwargs.items() if k not in _OWN_KWARGS and v is not None)
    if unexpected:
        raise ValueError(f"generate(lossless=True) does not pass model inputs {unexpected} to the model; "
                         "pass them without lossless=True.")
    mask, positions = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
    if positions is None and mask is not None:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if positions is not None and positions.shape[0] != batch:
        positions = positions.expand(batch, -1)
    return ([None if mask is None else mask[b:b + 1] for b in range(batch)],
            [None if positions is None else positions[b:b + 1] for b in range(batch)])


def _finish_rows(rows: list[_Row], has_eos: bool) -> None:
    """Without an EOS criterion stock generation runs every row until the batch stops: rows that stopped earlier
    continue (their criteria off) to the longest row's length."""
    if has_eos:
        return
    target = max(r.seq.shape[1] for r in rows)
    for row in rows:
        if row.seq.shape[1] < target:
            row.limit, row.use_criteria, row.done = target, False, False
            row.run()


def _stack(rows: list[_Row], per_row, width: int, fill, dtype, device):
    """`[B, width]` from each row's list (padded with `fill`)."""
    out = torch.full((len(rows), width), fill, dtype=dtype, device=device)
    for b, row in enumerate(rows):
        values = per_row(row)
        if len(values):
            out[b, :len(values)] = torch.as_tensor(values, dtype=dtype, device=device)
    return out


def _per_step(rows: list[_Row], name: str, width: int):
    """The scores / logits tuples of stock generation (one `[B, V]` per step; zeros where a row had finished)."""
    if not getattr(rows[0], name):
        return None
    steps = []
    for t in range(width):
        ref = next(getattr(r, name)[t] for r in rows if len(getattr(r, name)) > t)
        steps.append(torch.cat([getattr(r, name)[t] if len(getattr(r, name)) > t else torch.zeros_like(ref)
                                for r in rows], 0))
    return tuple(steps)


def _output(rows: list[_Row], input_ids, pad_token, generation_config):
    width = max(r.new_tokens for r in rows)
    fill = int(pad_token) if pad_token is not None else 0
    tokens = torch.full((len(rows), input_ids.shape[1] + width), fill, dtype=input_ids.dtype,
                        device=input_ids.device)
    for b, row in enumerate(rows):
        tokens[b, :row.seq.shape[1]] = row.seq[0]
    if not generation_config.return_dict_in_generate:
        return tokens
    out = compat.GenerateDecoderOnlyOutput(
        sequences=tokens, scores=_per_step(rows, "scores", width), logits=_per_step(rows, "logits", width),
        **{compat.GENERATE_CACHE_FIELD: rows[0].cache if len(rows) == 1 else None})
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
        `exit_layers`, `draft_tokens` and `accepted_tokens` (the cache only at batch size 1: rows have their own).
    """
    batch = input_ids.shape[0]
    if streamer is not None and batch > 1:
        raise ValueError(f"generate(lossless=True, streamer=...) needs a batch of one; got {batch} rows.")
    for option in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, option, False):
            raise ValueError(f"generate(lossless=True) does not return per-step internals; got {option}=True.")
    loop = _Loop(model, lossless_policy, lossless_num_layers, lossless_max_draft_tokens, logits_processor,
                 stopping_criteria, generation_config, streamer)
    masks, positions = _row_inputs(model_kwargs, batch)
    rows = [_Row(loop, input_ids[b:b + 1], masks[b], positions[b]) for b in range(batch)]
    for row in rows:
        row.prefill()
        row.run()
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    _finish_rows(rows, has_eos)
    if streamer is not None:
        streamer.end()
    pad_token, _ = compat.special_token_tensors(generation_config)
    return _output(rows, input_ids, pad_token, generation_config)


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
