"""The run-time guard: after a forward with early exit, every layer's KV cache must cover every position.

A transformers release we never tested can rename or reroute what our decoder-layer hook sees (5.24 renamed the
cache argument; a hook reading the old name silently stopped filling the layers a token skipped). Such a change
must fail, never corrupt: this check compares the per-layer cache lengths, which are Python ints kept by the cache
(no device sync), with what the step must have written.
"""

from __future__ import annotations

from .. import compat
from .exact import ExactExitCache

__all__ = ["CacheConsistencyError", "cache_layer_lengths", "check_cache_consistent"]


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


def check_cache_consistent(cache, run) -> None:
    """Raises `CacheConsistencyError` unless `cache` holds what the step of `run` must have left in it.

    Plain and propagate caches: every layer holds the same number of positions, past + query. The exact option:
    layer 0 holds every position; deeper layers may owe a suffix, which the pending buffer covers.
    """
    lengths = cache_layer_lengths(cache)
    known = [n for n in lengths if n is not None]
    if not known:
        return
    total = run.past_length + run.query_length
    if isinstance(cache, ExactExitCache):
        # layers no token has reached yet may not exist: they hold nothing
        lengths = lengths + [0] * (run.num_layers - len(lengths))
        known = [n for n in lengths if n is not None]
        pending = 0 if cache.pending_hidden is None else cache.pending_hidden.shape[1]
        ok = (len(lengths) == run.num_layers and lengths[0] == total
              and all(a >= b for a, b in zip(known, known[1:], strict=False))
              and known[-1] + pending == total)
    else:
        ok = len(lengths) == run.num_layers and all(n == total for n in known)
    if not ok:
        raise CacheConsistencyError(
            f"After a forward with early exit the KV cache holds {lengths} positions per layer; every layer "
            f"should hold {total} ({run.num_layers} layers). This means the installed transformers "
            f"{compat.TRANSFORMERS_VERSION} passes the cache to decoder layers in a way adainfer_hf does not "
            f"handle; {compat.tested_release_note()}. Install a tested release, or run without a cache "
            "(use_cache=False) until adainfer_hf supports this one."
        )
