"""The batched decoding loop of lossless early exit (`generate(..., lossless=True)`, `runtime/lossless.py`).

`LockstepBatch` decodes every row of the call at once in one `DraftExitCache`: each step feeds one token per row,
drafts when every row's check fired and verifies every row otherwise; each row accepts its own count, and the
rollback moves a row's rejected positions to its left, as masked padding, so its real positions stay a
contiguous suffix of the cache (exact for sliding-window layers too). The rule is documented in
`runtime/lossless.py` and docs/lossless.md.
"""

from __future__ import annotations

import torch

from ..cache.draft import DraftExitCache

__all__ = ["LockstepBatch"]


class _Settings:
    """What every row of one lossless `generate` call shares: the model, the policy, the prepared processors, the
    token buffer all rows write their verified tokens to."""

    def __init__(self, model, *, policy, num_layers, max_draft_tokens, logits_processor, stopping_criteria,
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
        # without an EOS criterion stock runs every row until the whole batch stops (`LockstepBatch.settle`)
        self.has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        # [B, max_length]: row b's verified tokens are tokens[b, :rows[b].n] (written in place: no cat per token)
        self.tokens = input_ids.new_zeros((input_ids.shape[0], max(self.max_length, input_ids.shape[1])))
        self.tokens[:, :input_ids.shape[1]] = input_ids


class _Row:
    """One row's verified text and what it emitted (its decoding runs in the batch: `LockstepBatch`)."""

    def __init__(self, loop: _Settings, index: int, prompt_length: int):
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
                    self.stopped_at = self.n  # goes on (criteria off) until every row stopped: `LockstepBatch.settle`

    def truncate(self, length: int) -> None:
        """Keeps the first `length` tokens (a row that ran past the batch's final length)."""
        keep = length - self.prompt_length
        self.n = length
        del self.layers[keep:], self.scores[keep:], self.logits[keep:]
        self.accepted = sum(layer < self.loop.num_layers for layer in self.layers)  # (an accepted draft's layer)


# A batch of several rows drafts only when every row's check fired, which the drafting objective (a simulation of
# one row) does not model. When, after BACKOFF_AFTER steps that ran the checks, fewer than BACKOFF_RATE of them
# drafted, the checks stop for the rest of the call: they cost a few percent of a step each (SmolLM2 at batch 4:
# 0.02 drafts per verification, 0.94x stock) and a rare draft cannot repay them. One row keeps the rule the
# objective chose for it. The text is the stock text either way; only the speed changes.
BACKOFF_AFTER = 16
BACKOFF_RATE = 1 / 8


class LockstepBatch:
    """The rows of one lossless `generate` call, decoding in lockstep in one `DraftExitCache`: one token per row
    per step, the same drafts in flight for every row, one verification for all of them; per-row rollback keeps
    each row's cache contiguous (see `runtime.lossless` for the rule). A batch of several rows whose checks rarely
    fire together stops checking (`BACKOFF_AFTER`, `BACKOFF_RATE`).

    Args:
        model: the AdaInfer model.
        input_ids (`torch.LongTensor`): `[B, n]` the prompts (left-padded as `generate` prepared them).
        mask (`torch.Tensor` or `None`), positions (`torch.LongTensor` or `None`): what `generate` prepared.
        settings (`dict`): `policy`, `num_layers`, `max_draft_tokens`, `logits_processor`, `stopping_criteria`,
            `generation_config`, `streamer` (see `lossless_decode`).

    Attributes:
        every_row (`list`): each row's verified text (`seq`, `n`), `layers`, `scores`, `logits`, `drafted` and
            `accepted`, in batch order; `rows` are those still decoding, in the cache's batch order.
        loop: what the rows share (the token buffer `tokens`, the processors, the criteria).
    """

    def __init__(self, model, input_ids, mask, positions, **settings):
        loop = self.loop = _Settings(model, input_ids=input_ids, **settings)
        rows = self.every_row = [_Row(loop, b, input_ids.shape[1]) for b in range(input_ids.shape[0])]
        self.rows = list(rows)
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
        self.checked_steps = self.draft_steps = 0  # steps that ran the checks; those that drafted
        self.backed_off = False  # the checks stopped (see BACKOFF_AFTER)

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

    def prefill(self) -> None:
        """The prompt at full depth (no exits); emits each row's first token."""
        logits, _ = self._forward(self.loop.tokens[:, :self.every_row[0].prompt_length], self.positions, None)
        self._verify(logits)

    def step(self) -> None:
        """Feeds each row's last token (verified or draft): a draft step when every row's check fired, else a
        verification of every row."""
        loop = self.loop
        cap = min(loop.max_draft_tokens, min(r.limit - r.n for r in self.rows) - 1)
        checks = len(self.drafts) < cap and not self.backed_off
        policy = loop.policy if checks else None  # None: full depth, catching the drafts up
        feed = self.drafts[-1][0] if self.drafts else self.last
        logits, layers = self._forward(feed[:, None], self.next_pos, policy)
        self.next_pos = self.next_pos + 1
        drafted = policy is not None and bool((layers < loop.num_layers).all())
        if policy is not None and len(self.every_row) > 1:
            self.checked_steps += 1
            self.draft_steps += drafted
            self.backed_off = (self.checked_steps >= BACKOFF_AFTER
                               and self.draft_steps < BACKOFF_RATE * self.checked_steps)
        if drafted:
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

    def settle(self) -> None:
        """Without an EOS criterion stock generation runs every row until the batch stops: once every row's
        criteria fired (or it reached its limit), every row ends at the longest such length (rows short of it go
        on with their criteria off; rows past it are cut back)."""
        every_row = self.every_row
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

    def run(self) -> None:
        """Decodes until every row is done (after `prefill`)."""
        while True:
            self.settle()
            if all(row.done for row in self.rows):
                return
            self.step()
