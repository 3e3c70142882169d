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

__all__ = ["lossless_decode", "lossless_generate", "resolve_lossless"]

# model kwargs `generate` prepares that the loop replaces with its own (per row) or does not need
_OWN_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep", "exit_recorder", "exit_policy",
               *compat.CACHE_ARG_NAMES)


class _Loop:
    """What every row of one lossless `generate` call shares: the model, the policy, the prepared processors, the
    token buffer all rows write their verified tokens to."""

    def __init__(self, model, policy, num_layers, max_draft_tokens, logits_processor, stopping_criteria,
                 generation_config, streamer, input_ids):
        self.model, self.policy, self.num_layers = model, policy, num_layers
        self.max_draft_tokens = max_draft_tokens
        self.processors, self.criteria, self.streamer = logits_processor, stopping_criteria, streamer
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = int(generation_config.max_length)
        self.keep_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
        self.keep_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)
        # Greedy without logits processors: the choices and the acceptance are argmaxes of the raw logits, made for
        # the whole batch in one call (the processors' per-position calls on the prefix are the identity then).
        self.plain = not self.do_sample and len(logits_processor or ()) == 0
        # Without an EOS criterion stock generation runs every row until the whole batch stops (see `_Batch.settle`)
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        # [B, max_length]: row b's verified tokens are tokens[b, :rows[b].n] (written in place: no cat per token)
        self.tokens = input_ids.new_zeros((input_ids.shape[0], max(self.max_length, input_ids.shape[1])))
        self.tokens[:, :input_ids.shape[1]] = input_ids


class _Row:
    """One row's verified text and what it emitted (its decoding runs in the batch: `_Batch`)."""

    def __init__(self, loop: _Loop, index: int, prompt_length: int):
        self.loop, self.index = loop, index
        self.n = self.prompt_length = prompt_length  # verified tokens (the prompt's padding included)
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.layers: list[int] = []
        self.drafted = self.accepted = 0
        self.limit = loop.max_length  # the sequence length this row may reach
        self.stopped_at: int | None = None  # (no EOS criterion) the length at which its criteria first fired
        self.done = False

    @property
    def seq(self) -> torch.Tensor:
        """`[1, n]` the verified tokens (a view of the loop's buffer)."""
        return self.loop.tokens[self.index:self.index + 1, :self.n]

    @property
    def new_tokens(self) -> int:
        return self.n - self.prompt_length

    def processed(self, prefix, raw):
        return self.loop.processors(prefix, raw.to(prefix.device, torch.float32))

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

    def emit(self, token, scores, raw, layer: int) -> None:
        """Appends one verified token (an int or a 0-d tensor) and applies the stopping criteria to it."""
        loop = self.loop
        loop.tokens[self.index, self.n] = token
        self.n += 1
        self.layers.append(layer)
        if loop.keep_scores:
            self.scores.append(scores)
        if loop.keep_logits:
            self.logits.append(raw)
        if loop.streamer is not None:
            loop.streamer.put(loop.tokens[self.index, self.n - 1:self.n].cpu())
        if self.n >= self.limit:
            self.done = True
        elif self.stopped_at is None:
            scores_so_far = tuple(self.scores) if loop.keep_scores else None
            if bool(loop.criteria(self.seq, scores_so_far).any()):
                if loop.has_eos:
                    self.done = True
                else:
                    self.stopped_at = self.n  # goes on (criteria off) until every row stopped: `_Batch.settle`

    def truncate(self, length: int) -> None:
        """Keeps the first `length` tokens (a row that ran past the batch's final length)."""
        keep = length - self.prompt_length
        self.n = length
        del self.layers[keep:], self.scores[keep:], self.logits[keep:]
        self.accepted = sum(layer < self.loop.num_layers for layer in self.layers)  # (an accepted draft's layer)


class _Batch:
    """The rows still decoding, in lockstep in one `DraftExitCache`: one token per row per step, the same drafts in
    flight for every row, one verification for all of them; per-row rollback keeps each row's cache contiguous."""

    def __init__(self, loop: _Loop, rows: list[_Row], mask, positions):
        self.loop, self.rows = loop, rows
        self.cache = DraftExitCache(config=loop.model.config)
        device = loop.tokens.device
        self.mask = None if mask is None else mask.clone()  # [B, >= length]: ones past `length`
        self.length = 0  # positions every layer of the cache holds (padding included)
        self.positions = positions  # the prompt's position ids (None: 0 .. n-1)
        n = rows[0].prompt_length
        self.next_pos = (positions[:, -1:] + 1) if positions is not None else \
            torch.full((len(rows), 1), n, dtype=torch.long, device=device)
        self.last = loop.tokens[:, n - 1]  # [B] each row's last verified token (fed next)
        self.drafts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # (tokens, q, layers)
        self._index = torch.arange(len(rows), device=device)  # rows' buffer indices
        self.settled = False  # (no EOS criterion) every row's final length is set

    # ------------------------------------------------------------------ forwards
    def _mask(self, total: int):
        """The 2-D attention mask over `total` positions (None where `generate` dropped an all-ones mask)."""
        mask = self.mask
        if mask is None:
            return None
        if mask.shape[1] < total:  # grow the buffer (ones: every position fed is a real token)
            self.mask = mask = torch.cat([mask, mask.new_ones((mask.shape[0], max(total, 2 * mask.shape[1])
                                                               - mask.shape[1]))], 1)
        return mask[:, :total]

    def _forward(self, input_ids, position_ids, policy):
        total = self.length + input_ids.shape[1]
        out = self.loop.model(input_ids=input_ids, attention_mask=self._mask(total), position_ids=position_ids,
                              cache=self.cache, use_cache=True, exit_policy=policy, logits_to_keep=1,
                              return_dict=True)
        self.length = total
        return out.logits, out.exit_layers

    def prefill(self, input_ids) -> None:
        """The prompt at full depth (no exits); emits each row's first token."""
        logits, _ = self._forward(input_ids, self.positions, None)
        self._verify(logits)

    def step(self) -> None:
        """Feeds each row's last token (verified or draft): a draft step when every row's check fired, else a
        verification of every row."""
        loop = self.loop
        cap = min(loop.max_draft_tokens, min(r.limit - r.n for r in self.rows) - 1)
        policy = loop.policy if len(self.drafts) < cap else None  # None: full depth, catching the drafts up
        feed = self.drafts[-1][0] if self.drafts else self.last
        logits, layers = self._forward(feed[:, None], self.next_pos, policy)
        self.next_pos = self.next_pos + 1
        if policy is not None and bool((layers < loop.num_layers).all()):
            self._draft(logits[:, -1], layers)
        else:
            self._verify(logits)

    # ------------------------------------------------------------------ drafts and verification
    def _draft(self, raw, layers) -> None:
        loop = self.loop
        q = None
        if loop.plain:
            tokens = raw.argmax(-1)
        else:
            flight = torch.stack([d for d, _, _ in self.drafts], 1) if self.drafts else None
            scores = torch.cat([row.processed(row.seq if flight is None else torch.cat([row.seq, flight[b:b + 1]], 1),
                                              raw[b:b + 1]) for b, row in enumerate(self.rows)], 0)
            if loop.do_sample:
                q = torch.softmax(scores, dim=-1)
                tokens = torch.multinomial(q, num_samples=1)[:, 0]
            else:
                tokens = scores.argmax(-1)
        self.drafts.append((tokens, q, layers))
        for row in self.rows:
            row.drafted += 1

    def _verify(self, logits) -> None:
        """`logits` [B, P + 1, V]: full-depth logits of the P draft positions (their predecessors' positions, i.e.
        predicting each draft) and of the current one. Each row accepts, corrects or adds one token; then every row
        is rolled back to its verified prefix."""
        drafts, self.drafts = self.drafts, []
        if logits.shape[1] != len(drafts) + 1:
            raise RuntimeError(f"lossless verification got logits for {logits.shape[1]} positions with "
                               f"{len(drafts)} draft(s) in flight; expected {len(drafts) + 1}.")
        if self.loop.plain:
            emitted = self._accept_greedy(logits, drafts)
        else:
            emitted = [self._accept_row(b, row, logits[b], drafts) for b, row in enumerate(self.rows)]
        self.roll_back([len(drafts) + 1 - e for e in emitted])

    def _accept_greedy(self, logits, drafts) -> list[int]:
        """Greedy acceptance of every row at once (argmaxes, one host transfer); returns each row's emitted count."""
        loop, num_layers = self.loop, self.loop.num_layers
        choice = logits.argmax(-1)  # [B, P + 1] the stock choices
        P = len(drafts)
        if P:
            made = torch.stack([d for d, _, _ in drafts], 1).to(choice.device)  # [B, P]
            agree = (choice[:, :P] == made).cumprod(1).sum(1)  # accepted drafts per row
            made_l, layers_l = made.tolist(), torch.stack([lay for _, _, lay in drafts], 1).tolist()
            agree_l = agree.tolist()
        choice_l = choice.tolist()
        keep = loop.keep_scores or loop.keep_logits
        emitted = []
        for b, row in enumerate(self.rows):
            k = agree_l[b] if P else 0
            count = 0
            for i in range(k + 1):
                raw = logits[b, i:i + 1].float() if keep else None
                if i < k:
                    row.accepted += 1
                    row.emit(made_l[b][i], raw, raw, layers_l[b][i])
                else:
                    row.emit(choice_l[b][i], raw, raw, num_layers)
                count += 1
                if row.done:
                    break
            emitted.append(count)
        return emitted

    def _accept_row(self, b: int, row: _Row, logits, drafts) -> int:
        """Row `b`'s acceptance with the logits processors on its verified prefix (sampling: speculative sampling);
        returns the tokens it emitted."""
        count = 0
        for i in range(len(drafts) + 1):
            raw = logits[i:i + 1].to(row.seq.device, torch.float32)
            scores = row.processed(row.seq, raw)
            count += 1
            if i < len(drafts):
                tokens, q, layers = drafts[i]
                accepted, token = row._accept(scores, tokens[b], None if q is None else q[b])
                row.accepted += int(accepted)
                row.emit(token, scores, raw, int(layers[b]) if accepted else self.loop.num_layers)
                if not accepted:
                    break
            else:
                row.emit(row._choose(scores), scores, raw, self.loop.num_layers)
            if row.done:
                break
        return count

    # ------------------------------------------------------------------ rollback
    def roll_back(self, remove: list[int]) -> None:
        """Drops each row's last `remove[b]` cached positions (rejected drafts, and a finished row's unused ones).

        The cache is cropped to the longest verified row; a row with `e` more positions to drop has them moved to
        its left, as extra padding (masked), so a row's real positions stay a contiguous suffix of the cache:
        position ids continue from its own length and sliding windows over cache indices still see its last W
        tokens."""
        common = min(remove)
        shifts = [r - common for r in remove]
        if any(shifts):
            self._shift_rows(shifts)
        self.cache.crop(common)  # (also trims sliding-window layers back to their window)
        self.length -= common
        self.next_pos = self.next_pos - torch.tensor(remove, device=self.next_pos.device)[:, None]
        ns = torch.tensor([r.n - 1 for r in self.rows], device=self.loop.tokens.device)
        self.last = self.loop.tokens[self._index, ns]
        self._drop_finished()

    def _shift_rows(self, shifts: list[int]) -> None:
        """Row b's cached positions move `shifts[b]` to the right (a per-row rotation: its last `shifts[b]`
        positions, rejected, wrap to the front, where the mask is zero; cropped off the end they were never
        needed)."""
        if self.mask is None:  # (no padding so far: `generate` passed no mask)
            self.mask = torch.ones((len(self.rows), self.length), dtype=torch.long, device=self.loop.tokens.device)
        rolled = {}
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            S, device = keys.shape[-2], keys.device
            if (S, device) not in rolled:
                shift = torch.tensor(shifts, device=device)
                rolled[S, device] = (torch.arange(S, device=device) - shift[:, None]) % S  # [B, S]
            index = rolled[S, device][:, None, :, None]
            layer.keys = keys.gather(2, index.expand_as(keys))
            layer.values = layer.values.gather(2, index.expand_as(layer.values))
        C = self.length
        shift = torch.tensor(shifts, device=self.mask.device)
        span = torch.arange(C, device=self.mask.device)
        mask = self.mask[:, :C].gather(1, (span - shift[:, None]) % C)
        self.mask[:, :C] = mask.masked_fill(span < shift[:, None], 0)
        self.mask[:, C - max(shifts):C] = 1  # (cropped off below; positions fed later are real)

    def _drop_finished(self) -> None:
        """Rows that finished leave the batch (unless none would be left: the last rows keep their cache)."""
        keep = [b for b, row in enumerate(self.rows) if not row.done]
        if not keep or len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.loop.tokens.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[b] for b in keep]
        self.next_pos, self.last = self.next_pos[index.to(self.next_pos.device)], self.last[index]
        self._index = torch.tensor([row.index for row in self.rows], device=index.device)
        if self.mask is not None:
            self.mask = self.mask[index.to(self.mask.device)]

    def settle(self, every_row: list[_Row]) -> None:
        """Without an EOS criterion stock generation runs every row until the batch stops: once every row's
        criteria fired (or it reached its limit), every row ends at the longest such length (rows short of it go
        on with their criteria off; rows past it are cut back)."""
        if self.settled or self.loop.has_eos or not all(r.done or r.stopped_at is not None for r in every_row):
            return
        self.settled = True
        target = max(r.stopped_at if r.stopped_at is not None else r.n for r in every_row)
        for row in self.rows:
            if row.n >= target:
                row.truncate(target)
                row.done = True
            else:
                row.limit = target
        self._drop_finished()

    def run(self, every_row: list[_Row]) -> None:
        while True:
            self.settle(every_row)
            if all(row.done for row in self.rows):
                return
            self.step()


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


def _output(loop: _Loop, rows: list[_Row], input_ids, pad_token, generation_config, cache):
    width = max(r.new_tokens for r in rows)
    fill = int(pad_token) if pad_token is not None else 0
    tokens = loop.tokens[:, :input_ids.shape[1] + width].clone()
    for b, row in enumerate(rows):
        tokens[b, row.n:] = fill
    if not generation_config.return_dict_in_generate:
        return tokens
    out = compat.GenerateDecoderOnlyOutput(
        sequences=tokens, scores=_per_step(rows, "scores", width), logits=_per_step(rows, "logits", width),
        **{compat.GENERATE_CACHE_FIELD: cache if len(rows) == 1 else None})
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
    loop = _Loop(model, lossless_policy, lossless_num_layers, lossless_max_draft_tokens, logits_processor,
                 stopping_criteria, generation_config, streamer, input_ids)
    mask, positions = _row_inputs(model_kwargs, batch)
    rows = [_Row(loop, b, input_ids.shape[1]) for b in range(batch)]
    decoding = _Batch(loop, rows, mask, positions)
    decoding.prefill(input_ids)
    decoding.run(rows)
    if streamer is not None:
        streamer.end()
    pad_token, _ = compat.special_token_tensors(generation_config)
    return _output(loop, rows, input_ids, pad_token, generation_config, decoding.cache)


def resolve_lossless(policy, lossless, exit_cache, max_draft_tokens) -> bool:
    """Whether a `generate` call decodes losslessly: `lossless` when given (a bool), else the policy's `drafting`
    (an artifact trained for drafting) unless the call names an `exit_cache`; never without a policy (nothing
    drafts: the stock path). `ValueError` naming a bad value, or `lossless=True` with `exit_cache="propagate"`."""
    if lossless is not None and not isinstance(lossless, bool):
        raise ValueError(f"lossless must be True, False or None (the classifier's choice); got {lossless!r}.")
    if isinstance(max_draft_tokens, bool) or not isinstance(max_draft_tokens, int) or max_draft_tokens < 1:
        raise ValueError(f"max_draft_tokens must be an int >= 1; got {max_draft_tokens!r}.")
    if lossless is None:
        lossless = exit_cache is None and getattr(policy, "drafting", False) is True
    if lossless and exit_cache == "propagate":
        raise ValueError("generate(lossless=True) verifies drafts with the exact cache; exit_cache='propagate' "
                         "cannot be verified. Pass exit_cache='exact' (or leave it out), or lossless=False.")
    return lossless and policy is not None


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
