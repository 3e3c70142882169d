"""Cached copies of weights and the one rule that says when a copy is stale.

The exit head keeps the LM head in the checks' dtype and the rows of each check vocabulary; the K/V fill keeps the
projections of every layer fused into one weight. Each copy is rebuilt when its sources change, by one rule:

1. **On every use, an identity key** of its sources: each tensor's `id`, storage pointer, `_version`, shape,
   dtype and device, and the type of each module it reads. This sees a new tensor (`resize_token_embeddings`,
   `load_state_dict(assign=True)`, re-tied weights), a move or cast (`model.to(dtype/device)`), any in-place op
   through autograd's view of the tensor (`mul_` on the parameter, `load_state_dict`, an optimizer step) and a
   module swapped for a wrapper (a PEFT adapter, `merge_and_unload`).
2. **Once per call, a sampled content check** before the copy's first use in that call: one element of each copied
   row (of every s-th row, s = ceil(rows / 512), from an offset that moves on by one at every check, for the head's
   copies), at a column that moves on as the offset wraps, is read from the sources in one gather and compared, bit
   for bit, with what the copy holds (the copy's dtype). This sees writes through `.data` (PEFT's `merge_adapter` /
   `merge_and_unload`, `weight.data.mul_(...)`, `embed_tokens.weight.data[token] = ...` on a tied head), which keep
   the storage and the `_version`: an edit that changes every element of a row, or of a share of the rows, is seen
   at the first call after it when it changes every row or a share above 1/s of the rows, and otherwise within s calls
   for a whole row; an edit of a few single elements is seen once the sample reaches them (at most `s * width`
   calls). Small 1-D sources (biases, norm weights) are compared in full. An edit smaller than the copy's
   rounding (a bf16 copy of an fp32 head) does not change the copy and is not seen.
   A "call" is the outermost `weight_call()` block of a thread: `AdaInferMixin.forward` and `generate` open one,
   so a whole `generate` checks each copy once; a use outside any block is a call of its own.

What it does not see: an edit through `.data` of elements the sample has not reached yet, made between two calls
(or inside one call, after the check). After such an edit call `refresh()` on the owner (`model.exit_head`,
`model.kv_fill`), which drops every copy.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["WeightCopies", "column_sample", "identity_key", "same_bits", "weight_call"]

_THREAD = threading.local()  # .depth: nesting of weight_call blocks; .epoch: the outermost block's number
_EPOCHS = itertools.count(1)


@contextlib.contextmanager
def weight_call():
    """One call (a forward, a whole `generate`): each cached copy verifies its content at most once inside it."""
    depth = getattr(_THREAD, "depth", 0)
    if depth == 0:
        _THREAD.epoch = next(_EPOCHS)
    _THREAD.depth = depth + 1
    try:
        yield
    finally:
        _THREAD.depth = depth


def _current_epoch() -> int:
    """The current call's number (a use outside any `weight_call` block is a call of its own)."""
    return _THREAD.epoch if getattr(_THREAD, "depth", 0) else next(_EPOCHS)


def identity_key(tensors: Sequence[torch.Tensor | None], modules: Sequence[nn.Module] = ()) -> tuple:
    """What identifies the sources of a copy without reading them (rule 1 of the module docstring)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                 for t in tensors) + tuple(type(m) for m in modules)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` hold the same values bit for bit (NaN payloads included); one device-to-host sync."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        as_int = _INT_OF_SIZE[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return bool(torch.equal(a, b.to(a.device)))


SAMPLED_ROWS = 512  # rows of a large copy compared per check (cold rows cost a cache miss each on a CPU)


def sample_positions(n_rows: int, width: int, step: int, device) -> tuple[torch.Tensor, int]:
    """The (rows, column) a check compares at `step`: every s-th row (s = ceil(n_rows / SAMPLED_ROWS)) from offset
    `step % s`, at column `(step // s) % width`; after `s * width` steps every element was compared once."""
    stride = max(1, -(-n_rows // SAMPLED_ROWS))
    return torch.arange(step % stride, n_rows, stride, device=device), (step // stride) % width


def column_sample(matrix: torch.Tensor, rows: torch.Tensor | None, column: int) -> torch.Tensor:
    """One element of each of `rows` (None: every row) of 2-D `matrix`, at column `column % width`, in one
    gather."""
    column %= matrix.shape[1]
    return matrix[:, column] if rows is None else matrix[rows.to(matrix.device), column]


class _Entry:
    __slots__ = ("key", "value", "verified", "column")

    def __init__(self, key, value, verified):
        self.key, self.value, self.verified, self.column = key, value, verified, 0


class WeightCopies:
    """Named copies derived from weights, each kept until the rule of this module says its sources changed.

    Not pickled (`__getstate__` of the owner drops it): copies are rebuilt on first use.
    """

    def __init__(self):
        self._entries: dict = {}

    def get(self, name, key: tuple, build: Callable[[], object], matches: Callable[[object, int], bool]):
        """The copy `name`, built by `build()` unless a kept one has the same identity `key` and, once per call,
        `matches(copy, column)` (the sampled content check at that rotating column) is True."""
        entry = self._entries.get(name)
        epoch = _current_epoch()
        if entry is not None and entry.key == key:
            if entry.verified == epoch:
                return entry.value
            entry.column += 1
            if matches(entry.value, entry.column):
                entry.verified = epoch
                return entry.value
        entry = _Entry(key, build(), epoch)
        self._entries[name] = entry
        return entry.value

    def drop(self, name=None) -> None:
        """Forgets the copy `name` (None: every copy)."""
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)

    def __contains__(self, name) -> bool:
        return name in self._entries
