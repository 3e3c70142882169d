"""The output logits of a forward through the exit loop (`AdaInferMixin.forward`'s last step).

Rows that exited carry their exit layer's hidden state (frozen; the exact cache keeps a copy of it while the row
runs on for the cache), so the final head over them is their logit lens at that layer; where the check already
computed it, its logits are reused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures.head import head_of
from .exit_run import ExitRun

__all__ = ["output_logits"]


def output_logits(model: nn.Module, hidden: torch.Tensor, logits_to_keep, run: ExitRun,
                  unchecked_too: bool = False):
    """LM-head logits of the final hidden states, reusing the exit check's logits where it fired.

    Rows that exited carry their exit layer's (frozen) hidden state, so the head gives the logit lens at that
    layer. When only the last position is kept, exited rows take the check's logits: the head is never run
    twice for the same token. Rows whose exit computed no lens (`run.defer_exit_head`: a policy that exits wherever its
    gate passes) get theirs here, in the same head call as the rows that ran every layer; so do the exact cache's
    rows that ran on after their exit (from the exit state it kept).

    One definition on every path: the logits at an exited row's last real position are its check's (computed in
    the policy's `check_dtype`, over its `check_vocabulary` with -inf elsewhere, cast to the head's dtype), for
    every form of `logits_to_keep` the stock class takes (0, an int k, a 1-D tensor of positions); the other
    positions of that row are the head over its exit layer's state. `unchecked_too=True` returns
    `(logits, unchecked)`, `unchecked` being the head over the exit layer's state there too (the stock model cut at
    the exit layer: what the loss reads, see `AdaInferMixin`), from the same head call.
    """
    head = head_of(model)
    # rows whose check's logits are the output (none where exits computed no lens: `run.defer_exit_head`)
    # (lossless verification outputs every row at full depth: `ExitCacheStrategy.full_depth_output`)
    full_depth = run.cache_strategy.full_depth_output
    exited = (run.exit_layers < run.num_layers) & (not run.defer_exit_head) & (not full_depth)
    last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1 and bool(
        (run.last_pos == hidden.shape[1] - 1).all())
    if last_only and bool(exited.any()) and not unchecked_too:
        out_dtype = head.dtype
        if bool(exited.all()) and run.exit_logits.dtype == out_dtype:
            return run.exit_logits.unsqueeze(1)  # every row exited: the checks' logits are the output
        device = run.exit_logits.device
        logits = torch.empty((hidden.shape[0], 1, run.exit_logits.shape[-1]), dtype=out_dtype, device=device)
        done = exited.nonzero().squeeze(-1).to(device)  # host-side indices: no device sync
        logits[done, 0] = run.exit_logits.index_select(0, done).to(out_dtype)
        running = (~exited).nonzero().squeeze(-1)
        if running.numel():
            h = hidden[running.to(hidden.device), -1:]
            logits[running.to(device)] = head.final(h).to(device, out_dtype)
        return logits
    if isinstance(logits_to_keep, int):
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
    else:
        keep = logits_to_keep
    normed = hidden[:, keep, :]
    if run.cache_strategy.frozen_hidden and not full_depth:
        # exact cache option: a row that exited kept running for the cache; its output is its exit layer's
        normed = normed.clone()
        for row, frozen in run.cache_strategy.frozen_hidden.items():
            normed[row] = head.norm(frozen[keep]).to(normed.device, normed.dtype)
    caught_up = run.cache_strategy.caught_up_final
    if caught_up is not None:  # lossless verification: the drafts' full-depth logits, in the same head call
        normed = torch.cat([head.norm(caught_up).to(normed.device, normed.dtype), normed], 1)
    # LM head [+ the family's softcap]: one call for every row (verification's several positions: `final_rows`)
    logits = head.final(normed) if caught_up is None else head.final_rows(normed)
    unchecked = logits
    if bool(exited.any()):
        if unchecked_too:
            logits = logits.clone()
        # An exited row's next-token logits are its check's (its check dtype, over its check vocabulary), as on
        # the path above, whichever form `logits_to_keep` takes (an int, or the positions as a 1-D tensor).
        offset = 0 if caught_up is None else caught_up.shape[1]
        kept = torch.arange(hidden.shape[1])[keep.cpu() if isinstance(keep, torch.Tensor) else keep]
        for row in exited.nonzero().squeeze(-1).tolist():
            where = (kept == int(run.last_pos[row])).nonzero()
            if where.numel():
                logits[row, offset + int(where[0, 0])] = run.exit_logits[row].to(logits.device, logits.dtype)
    return (logits, unchecked) if unchecked_too else logits
