"""Exit-layer bookkeeping: per-call records for `generate` and the model's running totals."""

from __future__ import annotations

import torch

__all__ = ["ExitRecorder", "ExitStatistics"]


class ExitRecorder:
    """Collects the exit layers of each forward of one `generate` call (one column per step)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def append(self, exit_layers: torch.Tensor) -> None:
        """Adds one step's exit layers [batch]."""
        self.steps.append(exit_layers.detach().cpu())

    def stacked(self) -> torch.LongTensor:
        """Exit layers [batch, steps]; empty [0, 0] when nothing was recorded."""
        if not self.steps:
            return torch.zeros((0, 0), dtype=torch.long)
        return torch.stack(self.steps, dim=1)


class ExitStatistics:
    """Running totals of exit layers: a histogram over 1..L, token count and mean layers.

    Args:
        num_layers (`int`): the model's decoder layer count L.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.histogram = torch.zeros(num_layers + 1, dtype=torch.long)  # index k: tokens that ran k layers

    def update(self, exit_layers: torch.Tensor) -> None:
        """Counts one token per row of `exit_layers`."""
        self.histogram += torch.bincount(exit_layers.detach().cpu().long(), minlength=self.num_layers + 1)

    @property
    def tokens(self) -> int:
        """Tokens counted."""
        return int(self.histogram.sum())

    @property
    def mean_layers(self) -> float:
        """Mean decoder layers run per token (nan before any token)."""
        if self.tokens == 0:
            return float("nan")
        layers = torch.arange(self.num_layers + 1, dtype=torch.float64)
        return float((self.histogram.double() * layers).sum() / self.tokens)

    @property
    def pruning_ratio(self) -> float:
        """Share of decoder layers skipped: 1 - mean_layers / L."""
        return 1.0 - self.mean_layers / self.num_layers

    def reset(self) -> None:
        """Sets every count back to zero."""
        self.histogram.zero_()

    def as_dict(self) -> dict:
        """Plain-Python summary (for logs and JSON)."""
        return {"tokens": self.tokens, "mean_layers": self.mean_layers, "num_layers": self.num_layers,
                "histogram": {k: int(v) for k, v in enumerate(self.histogram.tolist()) if v}}

    def __repr__(self):
        return f"ExitStatistics(tokens={self.tokens}, mean_layers={self.mean_layers:.2f}/{self.num_layers})"
