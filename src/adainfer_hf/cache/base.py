"""One interface for the KV-cache options of a forward with early exit (the loop calls it, never `isinstance`).

Modelled on transformers' `generation/candidate_generator.py`: a base class holds the methods the exit loop
(`runtime.exit_run.ExitRun`) calls, each option is a subclass, and `strategy_for(cache)` picks the one for a
cache object. For each decoder layer the strategy returns a `LayerPlan` (which rows run the layer, through which
forward) and the loop executes it; the strategy never runs rows itself.

| cache | strategy | rows that exit | once every row has exited |
|---|---|---|---|
| None | `NoCacheStrategy` | frozen | nothing to fill |
| plain `DynamicCache` / `StaticCache` | `EagerFillStrategy` | frozen, K/V filled from the frozen state | deeper layers filled now |
| `PropagateExitCache` | `PropagateStrategy` (cache/propagate.py) | as eager | deeper layers' fill deferred until read |
| `ExactExitCache` | `ExactStrategy` (cache/exact.py) | keep running; owed positions caught up later | nothing |

A cache class selects its strategy with the class attribute `exit_strategy_class`; caches without one (stock
transformers caches) get `EagerFillStrategy`.

The run-time guard (`check_cache_consistent`): a transformers release we never tested can rename or reroute what
our decoder-layer hook sees (5.24 renamed the cache argument; a hook reading the old name silently stopped filling
the layers a token skipped). Such a change must fail, never corrupt: after each forward the per-layer cache
lengths, Python ints kept by the cache (no device sync), are compared with what the step must have written.
"""

from __future__ import annotations

from .. import compat
from ..architectures import core as arch

__all__ = [
    "CacheConsistencyError",
    "EagerFillStrategy",
    "ExitCacheStrategy",
    "LayerPlan",
    "NoCacheStrategy",
    "cache_layer_lengths",
    "check_cache_consistent",
    "inconsistent_cache_error",
    "strategy_for",
]


class CacheConsistencyError(RuntimeError):
    """Raised when a forward with early exit left some layer's KV cache without an entry for some position."""


def cache_layer_lengths(cache) -> list[int | None]:
    """Positions each layer of `cache` holds, without computing deferred state (None where the length is unknown
    without a device sync, e.g. a static layer's tensor counter)."""
    lengths: list[int | None] = []
    for layer in getattr(cache, "layers", ()):
        owed = getattr(layer, "owed_length", None)
        n = owed() if owed is not None else layer.get_seq_length()
        lengths.append(n if isinstance(n, int) else None)
    return lengths


def inconsistent_cache_error(lengths, total: int, run) -> CacheConsistencyError:
    """The error for a cache holding `lengths` positions per layer after a step that should leave `total` in each
    (names the installed transformers release and what to do)."""
    return CacheConsistencyError(
        f"After a forward with early exit the KV cache holds {lengths} positions per layer; every layer "
        f"should hold {total} ({run.num_layers} layers). This means the installed transformers "
        f"{compat.TRANSFORMERS_VERSION} passes the cache to decoder layers in a way adainfer_hf does not "
        f"handle; {compat.tested_release_note()}. Install a tested release, or run without a cache "
        "(use_cache=False) until adainfer_hf supports this one."
    )


class LayerPlan:
    """How one decoder layer runs in a forward with early exit: returned by `ExitCacheStrategy.plan`, executed by
    the loop (`ExitRun.layer_forward`).

    Args:
        rows (`torch.LongTensor` or `None`): host batch indices of the rows that run the layer; None: no row runs it.
        subset (`bool`): `rows` are part of the batch only: the layer runs on their inputs, through a row-subset
            view of the cache that gives the other rows' K/V from their frozen hidden states.
        fill_skipped (`bool`): (no rows) the cache needs this step's K/V for the skipped layer now, computed from
            every row's frozen hidden state.
        forward (`Callable`, *optional*): runs the layer instead of its own forward, as
            `forward(layer_forward, hidden, args, kwargs)`, and returns the outputs of the query's positions only
            (the exact option runs an extended query and strips it).
        query_offset (`int`): positions `forward` prepends to the query inside the layer call, so per-position
            readers of the layer's internals (the sub-layer hooks) find each row's last token at its index + this.
    """

    __slots__ = ("fill_skipped", "forward", "query_offset", "rows", "subset")

    def __init__(self, rows=None, subset: bool = False, fill_skipped: bool = False, forward=None,
                 query_offset: int = 0):
        self.rows = rows
        self.subset = subset
        self.fill_skipped = fill_skipped
        self.forward = forward
        self.query_offset = query_offset


_NO_ROWS = LayerPlan()
_FILL_SKIPPED = LayerPlan(fill_skipped=True)


class ExitCacheStrategy:
    """How one forward with early exit keeps `cache` consistent. One instance per forward call (per-call state).

    Args:
        cache (`Cache` or `None`): the call's KV cache.

    Attributes:
        name (`str`): "none", "eager", "propagate" or "exact".
        needs_position_ids (`bool`): the strategy needs the query's position ids (the loop builds them if absent).
        frozen_hidden (`dict[int, torch.Tensor]`): rows whose output must come from this hidden state (their exit
            layer's) rather than from the decoder's last hidden state; empty unless rows kept running.
        caught_up_final (`torch.Tensor` or `None`): `[B, P, H]` last-layer outputs of earlier positions this step
            caught up (lossless verification, `cache/draft.py`); the output logits cover them before the query's.
        full_depth_output (`bool`): every row's output is its last layer's, even where its check fired (lossless
            verification, `cache/draft.py`); False: rows that exited output their exit layer's logits.
    """

    name = "base"
    needs_position_ids = False

    def __init__(self, cache=None):
        self.cache = cache
        self.frozen_hidden: dict = {}
        self.caught_up_final = None
        self.full_depth_output = False
        self.deeper_filled = False  # every deeper layer got this step's K/V at once (see after_exits)
        self._every_row: LayerPlan | None = None  # the all-rows plan, built once per forward

    @property
    def owes_positions(self) -> bool:
        """Whether deeper layers still owe positions of earlier steps, so even a step without checks must run
        through the exit loop (which catches them up)."""
        return False

    def plan(self, run, layer, rows) -> LayerPlan:
        """How `layer` runs. By default only the rows still going run it; rows that exited stay frozen.

        Args:
            run (`ExitRun`): the forward's loop (read only: batch size, model, positions).
            layer (`nn.Module`): the decoder layer about to run.
            rows (`torch.LongTensor` or `None`): host indices of the rows still going (`run.all_rows` when every
                row is), None once every row has exited.
        """
        if rows is None:
            return self._skip_plan()
        if rows.numel() == run.batch_size:
            return self._all_rows_plan(rows)
        return LayerPlan(rows, subset=True)

    def _skip_plan(self) -> LayerPlan:
        """The plan of a layer no row runs (the cache gets nothing for it unless the option fills it)."""
        return _NO_ROWS

    def _all_rows_plan(self, rows) -> LayerPlan:
        plan = self._every_row
        if plan is None or plan.rows is not rows:
            plan = self._every_row = LayerPlan(rows)
        return plan

    def after_exits(self, run, hidden, exited, kwargs) -> None:
        """Rows `exited` (host indices) exited after `run.layer`, whose full-batch output is `hidden` (when no row
        is left, the deeper layers owe this step's positions)."""

    def finish_step(self, run) -> None:
        """Called once after the decoder ran (bookkeeping across steps)."""

    def check_consistent(self, run) -> None:
        """Raises `CacheConsistencyError` unless the cache holds what the step must have left in it (every layer
        past + query positions). Reads Python ints kept by the cache: no device sync."""
        lengths = cache_layer_lengths(self.cache)
        known = [n for n in lengths if n is not None]
        if not known:
            return
        total = run.past_length + run.query_length
        if not (len(lengths) == run.num_layers and all(n == total for n in known)):
            raise inconsistent_cache_error(lengths, total, run)


class NoCacheStrategy(ExitCacheStrategy):
    """No KV cache (`use_cache=False`): nothing to fill or check."""

    name = "none"

    def check_consistent(self, run) -> None:
        return None


class EagerFillStrategy(ExitCacheStrategy):
    """A stock cache (`DynamicCache`, `StaticCache`, ...): skipped layers get their K/V now, from the frozen
    states (state propagation)."""

    name = "eager"

    def _skip_plan(self) -> LayerPlan:
        return _NO_ROWS if self.deeper_filled else _FILL_SKIPPED

    @staticmethod
    def _settles(run, kwargs) -> bool:
        """Whether no row is left running (the deeper layers owe this step's positions) and the layer call carries
        the cache to fill."""
        return not run.any_active() and compat.layer_cache(kwargs) is not None

    def after_exits(self, run, hidden, exited, kwargs) -> None:
        if not self._settles(run, kwargs):
            return
        rotary = run.spec.fill_position_embeddings(run.model, hidden, kwargs)
        stacked = arch.kv_fill_of(run.model).stacked(hidden, run.layer, rotary)
        if stacked is None:
            return  # layers on other devices (or not plain projections): filled one by one as the loop reaches them
        for idx, (k, v) in enumerate(stacked, start=run.layer):
            self.cache.update(k, v, idx)
        self.deeper_filled = True


def strategy_for(cache) -> ExitCacheStrategy:
    """The strategy of `cache` (None: no cache; a cache class's `exit_strategy_class`; stock caches: eager fill)."""
    if cache is None:
        return NoCacheStrategy(None)
    return getattr(type(cache), "exit_strategy_class", EagerFillStrategy)(cache)


def check_cache_consistent(cache, run) -> None:
    """Raises `CacheConsistencyError` unless `cache` holds what the step of `run` must have left in it.

    Each cache option states its own invariant (`ExitCacheStrategy.check_consistent`): plain and propagate caches
    hold past + query positions in every layer; the exact option's deeper layers may owe a suffix that its pending
    buffer covers.
    """
    strategy = run.cache_strategy if run.cache_strategy.cache is cache else strategy_for(cache)
    strategy.check_consistent(run)
