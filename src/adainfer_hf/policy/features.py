"""Exit features: one code path, used both to collect training data and inside the decoder loop.

All features describe the LAST token of each row at one decoder layer. The paper's two are `gap` (top-1 minus
top-2 probability of the logit-lens distribution) and `top_prob`; the others are the extended set it studied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FeatureSpec", "FEATURES", "DEFAULT_FEATURES", "LayerStats", "compute_features", "feature_needs"]

DEFAULT_FEATURES = ("gap", "top_prob")


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature needs from the decoder loop.

    Args:
        name (`str`): the feature's name, as stored in the artifact.
        needs (`frozenset[str]`): inputs besides the current layer's logits: `"prev_stats"` (the previous
            layer's distribution summary), `"prev_log_probs"` (its full log-distribution), `"hidden"` (last-token
            hidden states of this and the previous layer), `"sublayers"` (attention/MLP outputs of both).
        doc (`str`): one-line description.
    """

    name: str
    needs: frozenset
    doc: str


def _spec(name, needs, doc):
    return name, FeatureSpec(name, frozenset(needs), doc)


FEATURES: dict[str, FeatureSpec] = dict(
    [
        _spec("gap", (), "P(top1) - P(top2) of the logit lens"),
        _spec("top_prob", (), "P(top1) of the logit lens"),
        _spec("delta_gap", ("prev_stats",), "gap minus the previous layer's gap (0 at layer 1)"),
        _spec("delta_top_prob", ("prev_stats",), "top_prob minus the previous layer's (0 at layer 1)"),
        _spec("gap_x_top_prob", (), "gap * top_prob"),
        _spec("cos_hidden", ("hidden",), "cosine(hidden_l, hidden_{l-1}); layer 1 compares with the embedding"),
        _spec("cos_attn", ("sublayers",), "cosine of the attention output with the previous layer's (1 at layer 1)"),
        _spec("cos_mlp", ("sublayers",), "cosine of the MLP output with the previous layer's (1 at layer 1)"),
        _spec("kl_prev", ("prev_log_probs",), "KL(P_l || P_{l-1}) of the logit lens (0 at layer 1)"),
    ]
)


def feature_needs(names) -> frozenset:
    """The union of what the named features need (see `FeatureSpec.needs`); raises on unknown names."""
    needs = set()
    for name in names:
        if name not in FEATURES:
            raise ValueError(f"Unknown exit feature {name!r}; expected one of {sorted(FEATURES)}.")
        needs |= FEATURES[name].needs
    if "prev_log_probs" in needs:
        needs.add("prev_stats")
    return frozenset(needs)


@dataclass
class LayerStats:
    """Summary of one layer's logit-lens distribution for a set of rows (kept for the next layer's features)."""

    gap: torch.Tensor
    top_prob: torch.Tensor
    top_token: torch.Tensor
    log_probs: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> LayerStats:
        """The stats of a subset of rows (indices into this object's rows)."""
        lp = None if self.log_probs is None else self.log_probs[rows]
        return LayerStats(self.gap[rows], self.top_prob[rows], self.top_token[rows], lp)


def distribution_stats(logits: torch.Tensor, keep_log_probs: bool = False) -> LayerStats:
    """top-1/top-2 summary of `logits` [rows, vocab], computed in float32.

    Without `keep_log_probs` the full softmax is never materialised: top-2 of the logits and one logsumexp
    give the two probabilities.
    """
    logits = logits.float()
    top2 = logits.topk(2, dim=-1)
    if keep_log_probs:
        log_probs = torch.log_softmax(logits, dim=-1)
        lse = None
    else:
        log_probs = None
        lse = torch.logsumexp(logits, dim=-1)
    if log_probs is not None:
        p = log_probs.gather(-1, top2.indices).exp()
    else:
        p = (top2.values - lse.unsqueeze(-1)).exp()
    return LayerStats(gap=p[:, 0] - p[:, 1], top_prob=p[:, 0], top_token=top2.indices[:, 0], log_probs=log_probs)


def compute_features(
    names,
    logits: torch.Tensor,
    prev: LayerStats | None = None,
    hidden: torch.Tensor | None = None,
    prev_hidden: torch.Tensor | None = None,
    sublayers: tuple[torch.Tensor, torch.Tensor] | None = None,
    prev_sublayers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LayerStats]:
    """Computes the named features for the last token of each row at one layer.

    Args:
        names (`Sequence[str]`): feature names, in column order.
        logits (`torch.Tensor`): logit-lens logits [rows, vocab] of this layer.
        prev (`LayerStats`, *optional*): the previous layer's stats for the same rows (None at layer 1).
        hidden, prev_hidden (`torch.Tensor`, *optional*): last-token hidden states [rows, H] of this layer and the
            previous one (the embedding output at layer 1). Needed by `cos_hidden`.
        sublayers, prev_sublayers (`tuple`, *optional*): (attention output, MLP output) [rows, H] of this layer
            and the previous one (None at layer 1). Needed by `cos_attn`/`cos_mlp`.

    Returns:
        `(features, stats)`: float32 features [rows, len(names)] and this layer's `LayerStats`.
    """
    needs = feature_needs(names)
    stats = distribution_stats(logits, keep_log_probs="prev_log_probs" in needs)
    zeros = torch.zeros_like(stats.gap)
    cols = []
    for name in names:
        if name == "gap":
            col = stats.gap
        elif name == "top_prob":
            col = stats.top_prob
        elif name == "delta_gap":
            col = zeros if prev is None else stats.gap - prev.gap
        elif name == "delta_top_prob":
            col = zeros if prev is None else stats.top_prob - prev.top_prob
        elif name == "gap_x_top_prob":
            col = stats.gap * stats.top_prob
        elif name == "cos_hidden":
            col = _cos(hidden, prev_hidden, name)
        elif name in ("cos_attn", "cos_mlp"):
            i = 0 if name == "cos_attn" else 1
            if prev_sublayers is None:
                col = torch.ones_like(stats.gap)
            else:
                col = _cos(sublayers[i], prev_sublayers[i], name)
        else:  # kl_prev
            if prev is None or prev.log_probs is None:
                col = zeros
            else:
                col = (stats.log_probs.exp() * (stats.log_probs - prev.log_probs)).sum(-1)
        cols.append(col.float().to(stats.gap.device))
    return torch.stack(cols, dim=-1), stats


def _cos(a: torch.Tensor | None, b: torch.Tensor | None, name: str) -> torch.Tensor:
    if a is None or b is None:
        raise ValueError(f"Feature {name!r} needs this and the previous layer's vectors; got None.")
    return F.cosine_similarity(a.float(), b.float().to(a.device), dim=-1)
