"""The run-time guard: after a forward with early exit, every layer's KV cache must cover every position.

A transformers release we never tested can rename or reroute what our decoder-layer hook sees (5.24 renamed the
cache argument; a hook reading the old name silently stopped filling the layers a token skipped). Such a change
must fail, never corrupt: this check compares the per-layer cache lengths, which are Python ints kept by the cache
(no device sync), with what the step must have written.
"""

from __future__ import annotations

from .base import CacheConsistencyError, cache_layer_lengths, strategy_for

__all__ = ["CacheConsistencyError", "cache_layer_lengths", "check_cache_consistent"]


def check_cache_consistent(cache, run) -> None:
    """Raises `CacheConsistencyError` unless `cache` holds what the step of `run` must have left in it.

    Each cache option states its own invariant (`ExitCacheStrategy.check_consistent`): plain and propagate caches
    hold past + query positions in every layer; the exact option's deeper layers may owe a suffix that its pending
    buffer covers.
    """
    strategy = run.cache_strategy if run.cache_strategy.cache is cache else strategy_for(cache)
    strategy.check_consistent(run)
