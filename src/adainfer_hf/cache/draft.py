"""The cache of lossless early exit: the exact cache, plus what verification needs (the drafts' final states, a crop).

In lossless generation (`runtime/lossless.py`) a token that exits early is a *draft*: the positions it was fed at
owe their deeper layers in the exact cache (`ExactExitCache.pending_hidden`). The next token that runs every layer
catches those positions up, layer by layer, in the same calls (`ExactStrategy._catch_up_forward`); at the last
layer their outputs are the final hidden states the stock model would have computed there. `VerifyingStrategy`
keeps them (`caught_up_final`), and the forward's output logits (`runtime.output.output_logits`) run the final
norm and the LM head over them and the current token in one call: the full-depth logits of every draft position,
with no second forward. A draft that disagrees with them is discarded with everything after it: `DraftExitCache.crop`
truncates every layer to the verified prefix (sliding-window layers record their past for that, see
`compat.record_past`).
"""

from __future__ import annotations

from .. import compat
from ..architectures.few_rows import few_rows_linear
from ..compat import DynamicCache
from .exact import ExactExitCache, ExactStrategy

__all__ = ["DraftExitCache", "VerifyingStrategy"]


class VerifyingStrategy(ExactStrategy):
    """The exact option, keeping the final-layer outputs of the positions caught up at the last layer.

    A step in which some row ran every layer (and so, with the exact option, every row did) verifies every row:
    its output is every row's full-depth logits (`full_depth_output`), also for the rows whose check fired, since
    lossless decoding drafts only when every row's check fired.

    Attributes:
        caught_up_final (`torch.Tensor` or `None`): `[B, P, H]` outputs of the last decoder layer (before the final
            norm) at the `P` owed positions this step caught up there, in position order; None when the step did
            not reach the last layer with owed positions.
    """

    name = "exact"  # the exact option (its invariants and guard), verifying

    def finish_step(self, run) -> None:
        super().finish_step(run)
        self.full_depth_output = run.any_active()

    def _catch_up_forward(self, run, layer, owed, forward, hidden, args, kwargs):
        # the owed positions and the current one: a few rows, in the kernel that batches them on the CPU
        with few_rows_linear(layer, enabled=hidden.device.type == "cpu"):
            out = super()._catch_up_forward(run, layer, owed, forward, hidden, args, kwargs)
        if run.spec.layer_index(layer) == run.num_layers - 1:
            # the owed positions' frontier moved past the last layer: their final hidden states
            start = self.cache.pending_hidden.shape[1] - owed
            self.caught_up_final = self.cache.pending_hidden[:, start:]
        return out


class DraftExitCache(ExactExitCache):
    """An `ExactExitCache` whose owed positions are drafts to verify: it can be cropped back to a verified prefix.

    Created by `generate(..., lossless=True)` (one for the batch); sliding-window layers keep their past until
    the next `crop` so that a rejected draft can be removed from them too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        compat.record_past(self)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `tokens_to_remove` positions (>= 0) from every layer; 0 only trims sliding-window layers
        back to their window. Only when no position is owed (after a verification every layer holds every
        position)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove < 0:
            raise ValueError(f"tokens_to_remove must be an int >= 0; got {tokens_to_remove!r}.")
        if self.pending_hidden is not None:
            raise RuntimeError(f"DraftExitCache.crop({tokens_to_remove}) while {self.pending_hidden.shape[1]} "
                               "position(s) are owed to deeper layers; crop only after a full-depth step.")
        DynamicCache.crop(self, -tokens_to_remove)


DraftExitCache.exit_strategy_class = VerifyingStrategy
