"""The contract between the decoder loop and whatever decides to exit.

`ExitClassifier` (the trained artifact) implements it; `ScriptedExit` implements it with fixed exit layers,
for tests, benchmarks and "what if every token exited at k" studies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CHECK_DTYPES", "ExitPolicy", "ScriptedExit", "check_dtype_or_raise", "check_vocabulary_or_raise"]

CHECK_DTYPES = (None, "float16", "bfloat16", "float32")  # None: the LM head's own dtype


def check_dtype_or_raise(check_dtype: str | None) -> str | None:
    """Returns `check_dtype` when it is one of `CHECK_DTYPES`; raises `ValueError` naming it otherwise."""
    if check_dtype not in CHECK_DTYPES:
        raise ValueError(f"check_dtype={check_dtype!r} is not supported; expected one of {list(CHECK_DTYPES)}.")
    return check_dtype


def check_vocabulary_or_raise(vocabulary, width: int | None = None) -> tuple[int, ...] | None:
    """`vocabulary` (token ids a check scores, or None = all) as a sorted tuple; `ValueError` naming the value
    unless it holds at least 2 distinct ints in `[0, width)` (the gap needs a second token)."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, (str, bytes)) or not hasattr(vocabulary, "__iter__"):
        raise ValueError(f"check_vocabulary must be a sequence of token ids or None; got {vocabulary!r:.80}.")
    ids = list(vocabulary.tolist() if hasattr(vocabulary, "tolist") else vocabulary)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
           or (width is not None and t >= width)]
    if bad:
        where = f"[0, {width})" if width is not None else ">= 0"
        raise ValueError(f"check_vocabulary holds {len(bad)} id(s) that are not ints {where}, e.g. {bad[:5]!r}.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"check_vocabulary repeats token ids ({len(ids) - len(set(ids))} duplicate(s)); "
                         "expected distinct ids.")
    if len(ids) < 2:
        raise ValueError(f"check_vocabulary={ids!r} must hold at least 2 token ids (the gap compares two).")
    return tuple(sorted(ids))


class ExitPolicy:
    """Base class of exit decisions. Subclasses set `features`, `min_layer`, `check_layers` and `decide`.

    Layers are 1-based: "exit after layer k" means k decoder layers ran; k == L means no early exit.
    """

    features: tuple[str, ...] = ()
    min_layer: int = 1
    check_layers: tuple[int, ...] | None = None
    # Single-token steps after the prompt (decode) may have their own schedule: there a check costs several layers
    # (one LM head against one token's layer), in a long prompt a fraction of one. None = `check_layers`.
    decode_check_layers: tuple[int, ...] | None = None
    check_dtype: str | None = None  # dtype of the LM head the checks use (see CHECK_DTYPES)
    # Token ids a check scores (sorted tuple), None = the whole vocabulary. With one, a check computes only these
    # tokens' logits, its features describe the distribution over them, and a row that exits gets them as its
    # next-token logits (every other token -inf: decoding can choose only among them).
    check_vocabulary: tuple[int, ...] | None = None
    # A gate (`policy.gate.LinearGate`) in front of each check: where it does not pass, the check computes no LM
    # head and no features and the row keeps going. None = every check runs in full.
    gate = None
    # True: exits are drafts for lossless generation; `generate` verifies them unless told otherwise (`lossless=`).
    drafting: bool = False

    def exits_where_gate_passes(self) -> bool:
        """Whether every row this policy's gate passes exits, whatever the check's features say (a classifier
        trained with `method="gate_only"`). The loop then computes no logit lens at such a check: the row stops and
        its output comes from the final head, over its frozen hidden state, in one call with the other rows'.
        The default, False, always runs the check's head and `decide`."""
        return False

    def layers_to_check(self, num_layers: int, decode: bool = False) -> list[int]:
        """Sorted 1-based layers after which the loop asks `decide` (never the last layer: that is the output).

        Args:
            decode (`bool`, *optional*, defaults to `False`): the schedule of a cached single-token step.
        """
        scheduled = self.check_layers
        if decode and self.decode_check_layers is not None:
            scheduled = self.decode_check_layers
        if scheduled is not None:
            layers = sorted({int(k) for k in scheduled})
        else:
            layers = list(range(int(self.min_layer), num_layers))
        return [k for k in layers if self.min_layer <= k < num_layers]

    def decide(self, features: torch.Tensor, layer: int, rows: torch.Tensor, state=None) -> torch.Tensor:
        """Returns a BoolTensor [n_rows]: True where the row exits after `layer`.

        The loop calls every policy the same way, `decide(features, layer, rows, state=state)`.

        Args:
            features (`torch.Tensor`): float32 [n_rows, len(self.features)] on the LM head's device.
            layer (`int`): 1-based index of the layer just run.
            rows (`torch.LongTensor`): the batch indices of these rows.
            state (*optional*): what `begin_run` returned for this forward (None for row-wise policies, which
                ignore it).
        """
        raise NotImplementedError

    def begin_run(self, batch_size: int):
        """Called once per forward before any layer runs; returns per-call state, or None (the default).

        Policies that look at the whole layer sequence (a CRF) keep their state here, never on themselves: when
        the loop passes the returned state to every `decide(features, layer, rows, state=state)` of the forward.

        Args:
            batch_size (`int`): rows of the forward's batch.
        """
        return None

    def record(self, layer: int, rows: torch.Tensor, features: torch.Tensor, stats, logits: torch.Tensor) -> None:
        """Called after every logit-lens layer (checked or feeding a `delta_*` feature), before `decide`; the
        default does nothing. Feature collection overrides it to keep each layer's values.

        Args:
            layer (`int`): 1-based layer just run.
            rows (`torch.LongTensor`): batch indices of the rows the values belong to.
            features (`torch.Tensor`): float32 [n_rows, len(self.features)].
            stats (`LayerStats`): the layer's gap / top_prob / top_token (and log-probs when a feature needs them).
            logits (`torch.Tensor`): the logit lens of the rows' last tokens [n_rows, V].
        """

    def record_hidden(self, layer: int, rows: torch.Tensor, hidden: torch.Tensor) -> None:
        """Called after every logit-lens layer, before any gate, with the rows' last-token hidden states `[n_rows, H]`
        (before the final norm); the default does nothing. Feature collection overrides it to train a gate."""

    def validate_for(self, model, ignore_mismatch: bool = False) -> None:
        """Raises `ValueError` when this policy cannot be used with `model`."""

    def bind(self, model) -> ExitPolicy:
        """Records what identifies `model` (layer count, LM-head fingerprint, ...) where the policy has none, so a
        saved artifact refuses other models. The model classes call it whenever a policy meets a model; the base
        policy records nothing. Returns `self`."""
        return self


class ScriptedExit(ExitPolicy):
    """Exits every row after a fixed layer, ignoring the features.

    Args:
        exit_layer (`int` or `Sequence[int]`): the 1-based layer after which to exit; one per batch row, or one
            for all rows. A value >= the model's layer count means "run full depth".
        check_every_layer (`bool`, *optional*, defaults to `False`): when True, the loop still checks (computes
            the logit lens and features) after every layer before the exit, as an always-checking classifier
            would; when False only the exit layer is checked, the cheapest possible schedule.
        check_dtype (`str`, *optional*): dtype of the LM head used by the checks (see `CHECK_DTYPES`).
        check_vocabulary (`Sequence[int]`, *optional*): the token ids the checks score (see
            `ExitPolicy.check_vocabulary`); None = all.
    """

    def __init__(self, exit_layer: int | Sequence[int], check_every_layer: bool = False,
                 check_dtype: str | None = None, check_vocabulary: Sequence[int] | None = None):
        layers = list(exit_layer) if hasattr(exit_layer, "__iter__") else [exit_layer]
        # bool is an int subclass: ScriptedExit(True) would silently mean "exit after layer 1"
        if not layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layers):
            raise ValueError(f"exit_layer must be an int >= 1 or a non-empty list of them; got {exit_layer!r}.")
        self.exit_layer = exit_layer
        self.features = ("gap", "top_prob")
        self.min_layer = 1
        self._per_row = torch.tensor(layers)
        self.check_every_layer = check_every_layer
        self.check_dtype = check_dtype_or_raise(check_dtype)
        self.check_vocabulary = check_vocabulary_or_raise(check_vocabulary)
        self.check_layers = None if check_every_layer else tuple(sorted(set(layers)))

    def begin_run(self, batch_size):
        """Checks a per-row `exit_layer` against the forward's batch (`ValueError` naming both lengths)."""
        n = self._per_row.numel()
        if n not in (1, batch_size):
            raise ValueError(f"ScriptedExit got {n} layers (exit_layer={self.exit_layer!r}) for a batch of "
                             f"{batch_size} rows; pass one layer per row or a single layer for all rows.")
        return None

    def decide(self, features, layer, rows, state=None):
        """True where the row's scripted layer is `layer` or shallower (see `ExitPolicy.decide`)."""
        target = self._per_row.to(rows.device)
        target = target[rows] if target.numel() > 1 else target.expand(rows.shape[0])
        return (target <= layer).to(features.device)

    def __repr__(self):
        return f"ScriptedExit(exit_layer={self.exit_layer!r}, check_every_layer={self.check_every_layer})"
