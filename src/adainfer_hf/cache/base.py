"""One interface for the KV-cache options of a forward with early exit (the loop calls it, never `isinstance`).

Modelled on transformers' `generation/candidate_generator.py`: a base class holds the methods the exit loop
(`runtime.exit_run.ExitRun`) calls, each option is a subclass, and `strategy_for(cache)` picks the one for a
cache object:

| cache | strategy | rows that exit | once every row has exited |
|---|---|---|---|
| None | `NoCacheStrategy` | frozen | nothing to fill |
| plain `DynamicCache` / `StaticCache` | `EagerFillStrategy` | frozen, K/V filled from the frozen state | deeper layers filled now |
| `PropagateExitCache` | `PropagateStrategy` | as eager | deeper layers' fill deferred until read |
| `ExactExitCache` | `ExactStrategy` (cache/exact.py) | keep running; owed positions caught up later | nothing |

A cache class selects its strategy with the class attribute `exit_strategy_class`; caches without one (stock
transformers caches) get `EagerFillStrategy`.
"""

from __future__ import annotations

from .. import compat
from ..architectures import core as arch

__all__ = [
    "CacheConsistencyError",
    "EagerFillStrategy",
    "ExitCacheStrategy",
    "NoCacheStrategy",
    "cache_layer_lengths",
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


def _inconsistent(lengths, total: int, run) -> CacheConsistencyError:
    return CacheConsistencyError(
        f"After a forward with early exit the KV cache holds {lengths} positions per layer; every layer "
        f"should hold {total} ({run.num_layers} layers). This means the installed transformers "
        f"{compat.TRANSFORMERS_VERSION} passes the cache to decoder layers in a way adainfer_hf does not "
        f"handle; {compat.tested_release_note()}. Install a tested release, or run without a cache "
        "(use_cache=False) until adainfer_hf supports this one."
    )


class ExitCacheStrategy:
    """How one forward with early exit keeps `cache` consistent. One instance per forward call (per-call state).

    Args:
        cache (`Cache` or `None`): the call's KV cache.

    Attributes:
        name (`str`): "none", "eager", "propagate" or "exact".
        needs_position_ids (`bool`): the strategy needs the query's position ids (the loop builds them if absent).
        frozen_hidden (`dict[int, torch.Tensor]`): rows whose output must come from this hidden state (their exit
            layer's) rather than from the decoder's last hidden state; empty unless rows kept running.
        query_offset (`int`): positions prepended to the current layer call's query (exact catch-up), so
            per-position readers (sublayer features) find the query's last token.
    """

    name = "base"
    needs_position_ids = False

    def __init__(self, cache=None):
        self.cache = cache
        self.frozen_hidden: dict = {}
        self.query_offset = 0
        self.deeper_filled = False  # every deeper layer got this step's K/V at once (see after_all_exited)

    @property
    def owes_positions(self) -> bool:
        """Whether deeper layers still owe positions of earlier steps, so even a step without checks must run
        through the exit loop (which catches them up)."""
        return False

    def layer_forward(self, run, layer, forward, hidden, args, kwargs):
        """Runs one decoder layer: by default only for the rows still going, rows that exited stay frozen."""
        return run.run_active_rows(layer, forward, hidden, args, kwargs)

    def fill_skipped_layer(self, run, layer, hidden, kwargs) -> None:
        """No row runs `layer`; give the cache this step's K/V for it from the frozen states (if it needs them)."""

    def after_all_exited(self, run, hidden, kwargs) -> None:
        """Every row has exited after `run.layer`: the deeper layers owe this step's positions."""

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
            raise _inconsistent(lengths, total, run)


class NoCacheStrategy(ExitCacheStrategy):
    """No KV cache (`use_cache=False`): nothing to fill or check."""

    name = "none"

    def check_consistent(self, run) -> None:
        return None


class EagerFillStrategy(ExitCacheStrategy):
    """A stock cache (`DynamicCache`, `StaticCache`, ...): skipped layers get their K/V now, from the frozen
    states (state propagation)."""

    name = "eager"

    def fill_skipped_layer(self, run, layer, hidden, kwargs) -> None:
        if self.deeper_filled:
            return
        k, v = run.kv_for_rows(layer, hidden, kwargs, None)
        self.cache.update(k, v, arch.layer_index(run.model, layer))

    def after_all_exited(self, run, hidden, kwargs) -> None:
        stacked = arch.stacked_kv_states(run.model, hidden, run.layer,
                                         arch.fill_position_embeddings(run.model, hidden, kwargs))
        if stacked is None:
            return  # layers on other devices (or not plain projections): filled one by one as the loop reaches them
        for idx, (k, v) in enumerate(stacked, start=run.layer):
            self.cache.update(k, v, idx)
        self.deeper_filled = True


class PropagateStrategy(EagerFillStrategy):
    """`PropagateExitCache`: as the eager fill, but the deeper layers' fill waits until something reads them."""

    name = "propagate"

    def after_all_exited(self, run, hidden, kwargs) -> None:
        if self.cache.defer(run.model, hidden, run.layer, arch.fill_position_embeddings(run.model, hidden, kwargs)):
            self.deeper_filled = True
            return
        super().after_all_exited(run, hidden, kwargs)


def strategy_for(cache) -> ExitCacheStrategy:
    """The strategy of `cache` (None: no cache; a cache class's `exit_strategy_class`; stock caches: eager fill)."""
    if cache is None:
        return NoCacheStrategy(None)
    return getattr(type(cache), "exit_strategy_class", EagerFillStrategy)(cache)
