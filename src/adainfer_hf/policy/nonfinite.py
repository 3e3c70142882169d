"""Rows whose exit features are not finite (fp16 overflow, a nan in the hidden state) never exit.

One behaviour for every estimator: such a row does not exit at that layer (it runs on, as if the check had said
"continue"), the other rows decide as before, and the classifier warns once (`RuntimeWarning`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["NonFiniteRows"]


class NonFiniteRows:
    """The non-finite screen of one classifier: which rows may decide, and the one warning.

    On the CPU the check is immediate. On CUDA it never synchronises with the host (the linear fast path promises
    none): the "some row was non-finite" flag is copied to pinned memory without blocking and read by a later
    call once its copy has completed, so the warning may come one check late. Other devices check at once.

    Args:
        owner (`str`): how the warning names the classifier.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.warned = False
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def finite_rows(self, features: torch.Tensor) -> torch.Tensor:
        """BoolTensor [n_rows] on `features.device`: True where every feature of the row is finite."""
        finite = torch.isfinite(features).all(dim=1)
        if self.warned:
            return finite
        if features.device.type == "cuda":
            self._poll()
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(~finite.all(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(features.device))
            self._pending.append((flag, event))
        elif not bool(finite.all()):
            self.warn()
        return finite

    def host(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(X with non-finite rows zeroed, finite-row mask)` for scikit-learn, which refuses nan/inf."""
        X = np.asarray(X, dtype=np.float64)
        finite = np.isfinite(X).reshape(len(X), -1).all(axis=1)
        if finite.all():
            return X, finite
        self.warn()
        return np.where(finite[:, None], X, 0.0), finite

    def _poll(self) -> None:
        states = [(flag, event, event.query()) for flag, event in self._pending]
        self._pending = [(flag, event) for flag, event, done in states if not done]
        if any(bool(flag) for flag, _, done in states if done):
            self.warn()

    def warn(self) -> None:
        """Issues the warning, once per classifier."""
        if self.warned:
            return
        self.warned = True
        self._pending = []
        warnings.warn(
            f"{self.owner} got non-finite features (nan/inf, e.g. an fp16 overflow); those rows do not exit at "
            "that layer and run on. Warned once per classifier.",
            RuntimeWarning,
            stacklevel=4,
        )
