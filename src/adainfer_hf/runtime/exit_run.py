"""The per-layer exit loop: one `ExitRun` per forward call, driven from the decoder layers.

transformers' own `LlamaModel.forward` / `OPTDecoder.forward` compute masks, rotary embeddings and the loop; our
decoder-layer subclasses receive an `adainfer_run` keyword argument that travels through that loop untouched and
hand each layer call to `ExitRun.layer_forward`, which
  * asks the cache strategy for the layer's plan (`cache.base.LayerPlan`: which rows run it, through which
    forward) and executes it: by default only the rows that have not exited run (rows that exited keep their
    hidden state frozen), and the KV cache gets the skipping rows' K/V from their frozen hidden states,
  * after each scheduled layer runs the exit check: the gate, the logit lens of every running row's last token
    and its features, the policy's decision, and the exited rows' logits.
No per-call state lives on the model or its config.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from .. import compat
from ..architectures import core as arch
from ..cache.base import ExitCacheStrategy, LayerPlan, strategy_for
from ..policy.base import ExitPolicy
from ..policy.features import LayerStats, compute_features, feature_needs
from .rows import frozen_kv, subset_inputs

__all__ = ["ExitRun", "is_decode_step", "last_token_positions"]


def is_decode_step(query_length: int, past_length: int) -> bool:
    """Whether a forward is a cached single-token step (the decode schedule applies) rather than a prompt."""
    return query_length == 1 and past_length > 0


def last_token_positions(attention_mask: torch.Tensor | None, query_length: int, batch_size: int) -> torch.Tensor:
    """Index (within the current query) of each row's last real token, for left or right padding.

    `attention_mask` is the 2-D [B, past + query] mask given to the model (None = no padding). A mask prepared
    ahead (a 4-D tensor, or the dict keyed by layer type that `generate` builds for a static cache) carries no
    per-row padding we read: each row's last query position is its last token (left padding, as `generate` uses).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or query_length == 1:
        # (one query token: it is the last one; skipping the mask also skips a device-to-host copy per step)
        return torch.full((batch_size,), query_length - 1, dtype=torch.long)
    mask_q = attention_mask[:, -query_length:].to("cpu", torch.long)
    # Position of the last 1 in each row; rows with no real token in the query keep the last position.
    flipped_first_one = mask_q.flip(-1).argmax(-1)
    has_token = mask_q.sum(-1) > 0
    pos = query_length - 1 - flipped_first_one
    return torch.where(has_token, pos, torch.full_like(pos, query_length - 1))


# The `cos_attn` / `cos_mlp` features read the attention / MLP outputs through one permanent forward hook per
# sub-module (installed once, on first use). The hook finds the run that wants the output through this thread's
# registry: a plain forward in another thread, or a call without those features, sees no run and the hook returns
# at once, so no state leaks between calls or threads.
_THREAD = threading.local()  # .runs: {id(sub-module): (ExitRun, 0 = attention / 1 = MLP)} of this thread's calls
_HOOK_LOCK = threading.Lock()


def _sublayer_hook(module, inputs, output):
    runs = getattr(_THREAD, "runs", None)
    entry = runs.get(id(module)) if runs else None
    if entry is not None:
        run, which = entry
        run.record_sublayer(which, output)


def _ensure_sublayer_hooks(modules) -> None:
    with _HOOK_LOCK:
        for module in modules:
            if not module.__dict__.get("_adainfer_sublayer_hook", False):
                module.register_forward_hook(_sublayer_hook)
                module.__dict__["_adainfer_sublayer_hook"] = True


class ExitRun:
    """State of one forward call's early-exit loop (created by the model's `forward`, never stored on it).

    Args:
        model (`PreTrainedModel`): the AdaInfer causal LM.
        policy (`ExitPolicy`): decides, per row, after which layer to stop.
        batch_size (`int`), query_length (`int`): shape of the call's input.
        attention_mask (`torch.Tensor`, *optional*): the 2-D mask given to the model (for last-token positions).
        past_key_values (`Cache`, *optional*): the call's KV cache; its `ExitCacheStrategy` (cache/base.py) keeps
            it consistent for the rows that skip layers.
    """

    def __init__(self, model: nn.Module, policy: ExitPolicy, batch_size: int, query_length: int,
                 attention_mask: torch.Tensor | None = None, past_key_values=None,
                 position_ids: torch.Tensor | None = None):
        self.model = model
        self.policy = policy
        self.batch_size = batch_size
        self.spec = arch.spec_of(model)  # the family, bound once per forward
        self.num_layers = self.spec.num_layers(model)
        # (int(): a static cache's full-attention layer counts in a tensor it advances in place during the step)
        self.past_length = int(past_key_values.get_seq_length(0)) if past_key_values is not None else 0
        self.check_layers = set(policy.layers_to_check(self.num_layers, decode=is_decode_step(query_length,
                                                                                                self.past_length)))
        self.needs = feature_needs(policy.features)
        self.gate = policy.gate
        if self.gate is not None and "prev_stats" in self.needs:
            raise ValueError(f"features {list(policy.features)} read the previous layer's logit lens, which a gate "
                             "may skip; a gated policy reads only features of the current layer.")
        self.lens_layers = set(self.check_layers)
        if "prev_stats" in self.needs:
            self.lens_layers |= {k - 1 for k in self.check_layers if k > 1}
        self.query_length = query_length
        self.attention_mask = attention_mask
        self.cache_strategy: ExitCacheStrategy = strategy_for(past_key_values)
        if self.cache_strategy.needs_position_ids and position_ids is None:
            position_ids = torch.arange(self.past_length, self.past_length + query_length).unsqueeze(0)
        self.position_ids = position_ids
        self.head_device = self.spec.exit_head_device(model)
        self.check_dtype = None if policy.check_dtype is None else getattr(torch, policy.check_dtype)
        self.head_width = None if getattr(policy, "check_vocabulary", None) is None else model.exit_head.width
        self.vocabulary = model.exit_head.vocabulary(getattr(policy, "check_vocabulary", None))  # None: all
        self.last_pos = last_token_positions(attention_mask, query_length, batch_size)
        self.active = torch.ones(batch_size, dtype=torch.bool)  # host copy: decides row subsets
        self.exit_layers = torch.full((batch_size,), self.num_layers, dtype=torch.long)
        self.exit_logits: torch.Tensor | None = None  # [B, V] logits of rows that exited, on the head device
        # A policy that exits wherever its gate passes reads no lens: an exited row's logits then come from the
        # final head over its frozen hidden state, with the other rows' (one read of the head weight per forward
        # instead of one more per check that fired in a batch). Only where that head is the check's head.
        self.defer_exit_head = (self.gate is not None and self.vocabulary is None
                                and self.check_dtype in (None, arch.execution_dtype(model.get_output_embeddings()))
                                and policy.exits_where_gate_passes())
        self.layer = 0
        self.prev_stats: LayerStats | None = None
        self.prev_stats_layer = -1
        self.all_rows = torch.arange(batch_size)
        self._plan: LayerPlan | None = None  # the current layer's (its rows and query offset, for the hooks)
        self.ran_rows: list[torch.Tensor | None] = []  # per layer run so far: the rows that ran it (None: none)
        self.hidden_cur = self.hidden_prev = None  # last-token hidden states [B, H] (cos_hidden)
        self.sub_cur = self.sub_prev = None  # last-token attention / MLP outputs [B, H] (cos_attn, cos_mlp)
        self._sublayer_keys: list[int] = []  # sub-modules this run registered in the thread's registry
        self._displaced: dict = {}  # entries of an enclosing run in this thread (restored by close)
        # Policies that look at the layer sequence (CRF) keep per-call state here, never on themselves.
        self.policy_state = policy.begin_run(batch_size)
        if self.gate is not None and self.policy_state is not None:
            raise ValueError(f"{type(policy).__name__} keeps per-call state over the layer sequence, which a gate "
                             "would leave with gaps; use a row-wise classifier with a gate.")
        if "sublayers" in self.needs:
            self._install_sublayer_hooks()

    # ------------------------------------------------------------------ the layer call
    def layer_forward(self, layer: nn.Module, forward: Callable, hidden: torch.Tensor, args, kwargs):
        """Runs one decoder layer as the cache strategy plans it, then the exit check; returns the full-batch
        hidden states."""
        self.layer += 1
        running = self._running_rows()  # None once every row has exited
        plan = self._plan = self.cache_strategy.plan(self, layer, running)
        self.ran_rows.append(plan.rows)
        if plan.rows is None:
            return self._skip_layer(plan, layer, hidden, kwargs)
        out = self._run_rows(plan, layer, forward, hidden, args, kwargs)
        self._after_layer(out, running, kwargs)
        return out

    def full_batch_attentions(self, attentions):
        """The decoder's per-layer attention weights as full-batch tensors [B, heads, query, keys].

        A layer call on a row subset records weights for those rows only, and a layer no row ran records none;
        rows that did not run a layer get zeros there, so `attentions[l][i]` is always row i's.
        """
        if attentions is None:
            return None
        it = iter(attentions)
        full = []
        template = None
        for rows in self.ran_rows:
            if rows is None:
                full.append(None)
                continue
            weights = next(it)
            weights = weights[:, :, -self.query_length:]  # (exact catch-up prepends owed positions)
            if rows.numel() != self.batch_size:
                padded = weights.new_zeros((self.batch_size, *weights.shape[1:]))
                weights = padded.index_copy(0, rows.to(weights.device), weights)
            template = weights
            full.append(weights)
        return tuple(template.new_zeros(template.shape) if w is None else w for w in full)

    def any_active(self) -> bool:
        """Whether some row has not exited yet (host-side: no device sync)."""
        return bool(self.active.any())

    def _running_rows(self) -> torch.Tensor | None:
        """Host indices of the rows that have not exited (`all_rows` when none has), None when every row has."""
        n_active = int(self.active.sum())
        if n_active == 0:
            return None
        return self.all_rows if n_active == self.batch_size else self.active.nonzero().squeeze(-1)

    def _skip_layer(self, plan: LayerPlan, layer: nn.Module, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        """No row runs `layer`; where the plan says so, the cache gets this step's K/V for it from the frozen
        states."""
        cache = compat.layer_cache(kwargs)
        if plan.fill_skipped and cache is not None:
            k, v = frozen_kv(self.model, layer, hidden, kwargs, self.all_rows)
            cache.update(k, v, self.spec.layer_index(layer))
        return hidden

    def _run_rows(self, plan: LayerPlan, layer: nn.Module, forward: Callable, hidden: torch.Tensor, args, kwargs):
        """Runs `layer` on the plan's rows (a subset through a row-subset view of the cache); the other rows keep
        their hidden state. Returns the full-batch hidden states."""
        if self.layer == 1 and "hidden" in self.needs:
            self.hidden_cur = self._last_token(hidden, self.all_rows).to(self.head_device)
        self._track_begin()
        rows = plan.rows
        if plan.subset:
            sub_hidden, sub_args, sub_kwargs = subset_inputs(self.model, layer, rows, ~self.active, hidden, args,
                                                             kwargs)
            if plan.forward is None:
                sub_out = forward(sub_hidden, *sub_args, **sub_kwargs)
            else:
                sub_out = plan.forward(forward, sub_hidden, sub_args, sub_kwargs)
            out = hidden.index_copy(0, rows.to(hidden.device), sub_out)
        elif plan.forward is None:
            out = forward(hidden, *args, **kwargs)
        else:
            out = plan.forward(forward, hidden, args, kwargs)
        if "hidden" in self.needs:
            self.hidden_cur.index_copy_(0, rows.to(self.head_device),
                                        self._last_token(out, rows).to(self.head_device))
        return out

    def _after_layer(self, out: torch.Tensor, running: torch.Tensor, kwargs) -> None:
        """After a lens layer: the exit check of the running rows; the cache strategy hears of the rows that
        exited."""
        if self.layer in self.lens_layers and self.layer < self.num_layers:
            exited = self._check(out, running)
            if exited is not None:
                self.cache_strategy.after_exits(self, out, exited, kwargs)

    # ------------------------------------------------------------------ the exit check
    def _last_token(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pos = self.last_pos[rows].to(hidden.device)
        return hidden[rows.to(hidden.device), pos]

    def _check(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The exit check after the current layer for the running `rows`; returns the host indices of the rows
        that exited (None: none)."""
        h_last = self._last_token(hidden, rows)
        self.policy.record_hidden(self.layer, rows, h_last)
        rows, h_last = self._gate_rows(rows, h_last)
        if rows is None:
            return None
        if self.defer_exit_head:
            return self._exit(rows)  # no check logits: the final head gives them (`runtime.output`)
        logits, feats = self._lens_features(h_last, rows)
        if self.layer not in self.check_layers:
            return None  # a lens layer read only for the next layer's features
        fired = self._decide(feats, rows)
        if not bool(fired.any()):
            return None
        exited = self._exit(rows[fired])
        self._keep_exit_logits(logits, exited, fired)
        return exited

    def _gate_rows(self, rows: torch.Tensor, h_last: torch.Tensor):
        """The rows (and their last-token states) the gate passes at a scheduled check: `(None, None)` when none
        does; every row where no gate runs."""
        if self.gate is None or self.layer not in self.check_layers:
            return rows, h_last
        return self.gate.select(rows, h_last, self.layer)

    def _lens_features(self, h_last: torch.Tensor, rows: torch.Tensor):
        """The logit lens of `rows`' last tokens and their features (kept for the next layer's, and recorded);
        returns `(logits, features)`."""
        logits = self.model.exit_head.logits(h_last, self.check_dtype, self.vocabulary)
        prev = None
        if self.prev_stats is not None and self.prev_stats_layer == self.layer - 1:
            prev = self.prev_stats.select(rows.to(self.prev_stats.gap.device))
        r = rows.to(self.head_device)
        h_cur = h_prev = subl = prev_subl = None
        if "hidden" in self.needs:
            h_cur, h_prev = self.hidden_cur[r], self.hidden_prev[r]
        if "sublayers" in self.needs:
            subl = tuple(t[r] for t in self.sub_cur)
            if self.layer > 1:
                prev_subl = tuple(t[r] for t in self.sub_prev)
        feats, stats = compute_features(self.policy.features, logits, prev, h_cur, h_prev, subl, prev_subl)
        if self.vocabulary is not None:  # positions in the vocabulary -> token ids
            stats.top_token = self.vocabulary.to(stats.top_token.device)[stats.top_token]
        self._remember(stats, rows)
        self.policy.record(self.layer, rows, feats, stats, logits)
        return logits, feats

    def _decide(self, feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The policy's decision for `rows` as a host BoolTensor (the one device-to-host sync of a check)."""
        fired = self.policy.decide(feats, self.layer, rows.to(feats.device), state=self.policy_state)
        return fired.to("cpu", torch.bool)

    def _keep_exit_logits(self, logits: torch.Tensor, exited: torch.Tensor, fired: torch.Tensor) -> None:
        """Keeps the check's logits of the rows that exited (`fired`: the host mask over the checked rows) as their
        output; over the head's width where the check scored a vocabulary."""
        if self.vocabulary is not None:
            logits = self._over_head(logits)
        if self.exit_logits is None and exited.numel() == self.batch_size:
            self.exit_logits = logits  # the whole batch exits at once (always so at batch 1): no copy
            return
        if self.exit_logits is None:
            self.exit_logits = logits.new_zeros((self.batch_size, logits.shape[-1]))
        local = fired.nonzero().squeeze(-1).to(logits.device)  # host indices: no extra sync
        self.exit_logits.index_copy_(0, exited.to(logits.device), logits.index_select(0, local))

    def _exit(self, rows: torch.Tensor) -> torch.Tensor:
        """Marks host batch indices `rows` as exited after the current layer; returns them."""
        self.exit_layers[rows] = self.layer
        self.active[rows] = False
        return rows

    def _over_head(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over `check_vocabulary` [n, K] as the head's [n, V]: every other token gets -inf."""
        return self.model.exit_head.over_head(logits, self.vocabulary)

    def _remember(self, stats: LayerStats, rows: torch.Tensor) -> None:
        """Keeps this layer's per-row values for the next layer's `delta_*`, `kl_prev` and `cos_*` features."""
        if "prev_stats" in self.needs:
            if self.prev_stats is None:
                full = LayerStats(
                    gap=stats.gap.new_zeros(self.batch_size),
                    top_prob=stats.top_prob.new_zeros(self.batch_size),
                    top_token=stats.top_token.new_zeros(self.batch_size),
                    log_probs=None if stats.log_probs is None
                    else stats.log_probs.new_zeros((self.batch_size, stats.log_probs.shape[-1])),
                )
                self.prev_stats = full
            r = rows.to(stats.gap.device)
            self.prev_stats.gap.index_copy_(0, r, stats.gap)
            self.prev_stats.top_prob.index_copy_(0, r, stats.top_prob)
            self.prev_stats.top_token.index_copy_(0, r, stats.top_token)
            if stats.log_probs is not None:
                self.prev_stats.log_probs.index_copy_(0, r, stats.log_probs)
            self.prev_stats_layer = self.layer

    # ------------------------------------------------------------------ vectors the cos_* features compare
    def _track_begin(self) -> None:
        """Moves this layer's tracked last-token vectors to "previous" before the layer runs."""
        if "hidden" in self.needs:
            self.hidden_prev = self.hidden_cur.clone()
        if "sublayers" in self.needs and self.sub_cur is not None:
            self.sub_prev = tuple(t.clone() for t in self.sub_cur)

    def _install_sublayer_hooks(self) -> None:
        layers = self.spec.decoder_layers(self.model)
        pairs = [(m, which) for layer in layers
                 for which, m in enumerate(self.spec.sublayers(layer))]
        _ensure_sublayer_hooks([m for m, _ in pairs])
        runs = _THREAD.__dict__.setdefault("runs", {})
        for module, which in pairs:
            key = id(module)
            if key in runs:
                self._displaced[key] = runs[key]
            runs[key] = (self, which)
            self._sublayer_keys.append(key)

    def record_sublayer(self, which: int, output) -> None:
        """Keeps the last-token vector of a sub-layer's output (0 = attention, 1 = MLP) for the running rows."""
        out = output[0] if isinstance(output, tuple) else output
        plan = self._plan
        rows = plan.rows
        out = self.spec.sublayer_output(out, rows.numel())  # as [rows, T, H] (OPT's fc2: [rows*T, H])
        local = torch.arange(rows.numel(), device=out.device)
        pos = self.last_pos[rows].to(out.device) + plan.query_offset  # (the exact catch-up's owed positions first)
        vec = out[local, pos].detach().to(self.head_device, torch.float32)
        if self.sub_cur is None:
            self.sub_cur = tuple(vec.new_zeros((self.batch_size, vec.shape[-1])) for _ in range(2))
        self.sub_cur[which].index_copy_(0, rows.to(self.head_device), vec)

    def close(self) -> None:
        """Takes this run out of the thread's sub-layer registry (the hooks themselves stay, idle)."""
        runs = getattr(_THREAD, "runs", None)
        if runs is not None:
            for key in self._sublayer_keys:
                if runs.get(key, (None,))[0] is self:
                    if key in self._displaced:
                        runs[key] = self._displaced[key]
                    else:
                        del runs[key]
        self._sublayer_keys.clear()
        self._displaced.clear()
