"""Checks over a shortlist of the vocabulary: choosing the shortlist and the feature tables it implies.

A check's LM head costs as many rows as the vocabulary has tokens: on Gemma-3 (262,144) one full-vocabulary check
in a decode step costs more than the whole decoder stack. With `check_vocabulary` (`policy.base.ExitPolicy`) a
check computes only K tokens' logits, and an exit's next-token logits are those K (every other token `-inf`).
Whether the exit is right is then a different event: the shortlist's top-1 must be the dense model's token, which
fails whenever that token is outside the shortlist. [`restrict_table`] recomputes a feature table as such checks
would have recorded it (features and top-1 over the shortlist, from the table's hidden states), so training,
Learn-then-Test calibration and the schedule measure the rule that runs; [`choose_check_vocabulary`] takes the
dense model's most frequent next tokens in a (training) table, then the tokenizer's most frequent ones.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import torch

from ..architectures.head import head_of
from ..policy.base import check_vocabulary_or_raise
from ..policy.features import compute_features, feature_needs
from .table import FeatureTable

__all__ = ["choose_check_vocabulary", "restrict_table", "restrict_tables"]


def choose_check_vocabulary(table: FeatureTable, size: int, width: int | None = None) -> tuple[int, ...]:
    """`size` token ids (sorted): the dense model's next tokens over `table`'s units (`final_token`), most
    frequent first (ties by id), then the lowest ids not yet taken, up to `width` (the head's outputs; default
    `size` plus the largest dense token). Byte-level BPE and SentencePiece vocabularies number their tokens roughly
    by corpus frequency (merge order, piece score), so low ids are the frequent tokens a table may not show.
    Shorter than `size` only when `width` is."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"check vocabulary size must be an int >= 2; got {size!r}.")
    ids, counts = np.unique(np.asarray(table.final_token, dtype=np.int64), return_counts=True)
    chosen = [int(t) for t in ids[np.lexsort((ids, -counts))][:size]]  # by count (descending), then id
    width = size + (max(chosen) + 1 if chosen else 0) if width is None else width
    taken = set(chosen)
    chosen += list(itertools.islice((t for t in range(width) if t not in taken), size - len(chosen)))
    if len(chosen) < 2:
        raise ValueError(f"a check vocabulary needs at least 2 tokens; width={width} leaves {len(chosen)}.")
    return tuple(sorted(chosen))


@torch.no_grad()
def restrict_table(model, table: FeatureTable, vocabulary: Sequence[int], batch_size: int = 4096) -> FeatureTable:
    """`table` as checks over `vocabulary` would have recorded it: each row's features and top-1 token recomputed
    from its hidden state (`table.hidden`, float16) through the final norm and the vocabulary's rows of `model`'s
    LM head (in the table's `check_dtype`); `meta["check_vocabulary"]` names the vocabulary, which classifiers
    trained on the table inherit (`train.train_exit_classifier`).

    Raises:
        `ValueError`: the table has no hidden states, a feature needs more than the current layer's lens (the
            previous layer's, hidden states or sub-layer outputs are not in a table), or an id is not a token of
            the model's head.
    """
    if table.hidden is None:
        raise ValueError("restricting a table recomputes its features from its hidden states, but it has none; "
                         "collect it with hidden_states=True.")
    needs = feature_needs(table.feature_names)
    if needs:
        raise ValueError(f"features {list(table.feature_names)} need {sorted(needs)} besides the layer's own lens; "
                         "only such features can be recomputed over a check vocabulary.")
    head = head_of(model)
    ids = check_vocabulary_or_raise(vocabulary, head.width)
    device = head.device
    index = head.vocabulary(ids)
    dtype = table.meta.get("check_dtype")
    dtype = None if dtype is None else getattr(torch, dtype)
    model_dtype = next(model.parameters()).dtype
    X = np.empty_like(table.X)
    top = np.empty_like(table.top_token)
    with head.session():  # one call: the gathered rows are verified once for the whole table
        for start in range(0, len(table), batch_size):
            h = torch.from_numpy(table.hidden[start:start + batch_size]).to(device, model_dtype)
            logits = head.logits(h, dtype, index)
            feats, stats = compute_features(table.feature_names, logits)
            X[start:start + len(h)] = feats.cpu().numpy()
            top[start:start + len(h)] = index[stats.top_token].cpu().numpy()
    meta = dict(table.meta, check_vocabulary=list(ids))
    return dataclasses.replace(table, X=X, top_token=top, meta=meta)


def restrict_tables(model, train_table: FeatureTable, calib_table: FeatureTable | None, check_vocabulary):
    """(train, calibration) tables as checks over `check_vocabulary` record them: the ids, or (an int) that many
    chosen on `train_table` ([`choose_check_vocabulary`]); None leaves both as they are. A None `calib_table`
    stays None."""
    if check_vocabulary is None:
        return train_table, calib_table
    ids = check_vocabulary
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = choose_check_vocabulary(train_table, ids, head_of(model).width)
    return (restrict_table(model, train_table, ids),
            None if calib_table is None else restrict_table(model, calib_table, ids))
