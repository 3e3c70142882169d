"""Tokenizer settings that batched last-token reads need, set for a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["left_padding"]


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator:
    """Pads on the left (the last real token then sits at the last position of every row) for the block.

    A tokenizer without a pad token pads with its eos token meanwhile. Both settings are restored on exit, also
    when the block raises.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer, changed in place for the block.

    Yields:
        The same tokenizer.
    """
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
