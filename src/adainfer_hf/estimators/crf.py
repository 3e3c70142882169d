"""A linear-chain CRF over each prompt's layer sequence (training method `"crf"`; `pip install adainfer-hf[crf]`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = ["CRFExitEstimator"]


class CRFExitEstimator(ClassifierMixin, BaseEstimator):
    """A linear-chain CRF over the layer sequence of each prompt (labels: 1 = "the top-1 is already right").

    The CRF scores a whole sequence of layers, so its decisions are meaningful per *sequence*:
    [`~CRFExitEstimator.predict_sequences`] (Viterbi) and [`~CRFExitEstimator.causal_scores`] (P(label 1 at layer
    k | layers 1..k), the score a live policy could use) take a list of `[num_layers, F]` arrays. The row-wise
    `predict`/`predict_proba` that `ExitClassifier.decide` calls treat every row as a sequence of length one: they
    exist for API compatibility and are NOT what calibration measured. Live CRF decisions need the decoder loop to
    hand the policy each row's feature history (see the project notes on a stateful policy).

    Args:
        c1 (`float`, *optional*, defaults to 0.05), c2 (`float`, *optional*, defaults to 0.05): L1 / L2 penalties.
        max_iterations (`int`, *optional*, defaults to 100): L-BFGS iterations.
        feature_names (`Sequence[str]`, *optional*): column names, used in the CRF's feature keys.
    """

    def __init__(self, c1: float = 0.05, c2: float = 0.05, max_iterations: int = 100, feature_names=None):
        self.c1 = c1
        self.c2 = c2
        self.max_iterations = max_iterations
        self.feature_names = feature_names

    @staticmethod
    def _crfsuite():
        try:
            import sklearn_crfsuite
        except ImportError as err:
            raise ImportError("method='crf' needs sklearn-crfsuite: `pip install adainfer-hf[crf]`.") from err
        return sklearn_crfsuite

    def _names(self, width: int) -> list[str]:
        return list(self.feature_names) if self.feature_names is not None else [f"f{i}" for i in range(width)]

    def _to_dicts(self, seq: np.ndarray) -> list[dict]:
        # The raw value is a linear term; a coarse bin adds the non-linearity a linear CRF otherwise lacks.
        names = self._names(seq.shape[1])
        return [
            {
                "bias": 1.0,
                **{n: float(v) for n, v in zip(names, row, strict=True)},
                **{
                    f"{n}@{int(round(np.clip(v, -1.0, 1.0) * 5))}": 1.0
                    for n, v in zip(names, row, strict=True)
                },
            }
            for row in seq
        ]

    def fit(self, sequences: Sequence[np.ndarray], labels: Sequence[np.ndarray]):
        """Fits on a list of `[T_i, F]` feature sequences and their `[T_i]` 0/1 label sequences."""
        seqs = [check_array(s) for s in sequences]
        if not seqs:
            raise ValueError("CRFExitEstimator.fit got no sequences.")
        crf = self._crfsuite().CRF(
            algorithm="lbfgs",
            c1=self.c1,
            c2=self.c2,
            max_iterations=self.max_iterations,
            all_possible_transitions=True,
        )
        crf.fit([self._to_dicts(s) for s in seqs], [[str(int(v)) for v in y] for y in labels])
        self.crf_ = crf
        self.n_features_in_ = seqs[0].shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def _marginal_one(self, seq_dicts: list[dict]) -> np.ndarray:
        return np.array([m.get("1", 0.0) for m in self.crf_.predict_marginals_single(seq_dicts)])

    def predict_sequences(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Viterbi labels (int `[T_i]`) of each whole sequence."""
        check_is_fitted(self)
        return [
            np.array([int(t) for t in self.crf_.predict_single(self._to_dicts(check_array(s)))])
            for s in sequences
        ]

    def causal_scores(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """P(label 1 at position k | positions 1..k) for every k: what a layer-by-layer policy can know."""
        check_is_fitted(self)
        out = []
        for s in sequences:
            dicts = self._to_dicts(check_array(s))
            out.append(np.array([self._marginal_one(dicts[: k + 1])[-1] for k in range(len(dicts))]))
        return out

    def extend_history(self, history: list, row: np.ndarray) -> float:
        """Appends one layer's features `row` [F] to a sequence `history` (a list, initially empty, kept by the
        caller) and returns P(label 1 at this layer | the layers so far): `causal_scores`, one layer at a time."""
        check_is_fitted(self)
        history.extend(self._to_dicts(np.asarray(row, dtype=np.float64).reshape(1, -1)))
        return float(self._marginal_one(history)[-1])

    def predict_proba(self, X) -> np.ndarray:
        """Row-wise P(exit), each row taken as a length-1 sequence (see the class docstring)."""
        check_is_fitted(self)
        X = check_array(X, ensure_min_samples=0)
        p = np.array([self._marginal_one(self._to_dicts(row[None]))[0] for row in X])
        return np.stack([1.0 - p, p], axis=1) if p.size else np.zeros((0, 2))

    def predict(self, X) -> np.ndarray:
        """Row-wise labels, each row taken as a length-1 sequence (see the class docstring)."""
        return (self.predict_proba(X)[:, 1] > 0.5).astype(int)
