"""A gate in front of the exit check: decides, from the hidden state alone, whether a check computes the LM head.

A full check runs the final norm and the LM head over the whole vocabulary on a row's last token. In a
single-token decode step that costs more than a decoder layer on every modern model (SmolLM2-135M 6.5-13 layers,
Qwen2.5-0.5B ~9, Gemma-3-270M ~30), so a schedule that checks in decode cannot pay. The gate is a linear probe on
the last token's RMS-normalised hidden state, one per checked layer:

    score_l(h) = w_l . (h / rms(h)) + b_l,    the check continues only where score_l(h) >= t_l

It costs one dot product of length H per row (about 1/(12 H) of a layer's multiply-adds). It is trained on the
same feature tables as the classifier to predict "this layer's logit lens already agrees with the final layer",
and its thresholds are set on the training split to keep a given recall of those rows. Where it passes, the
paper's features and classifier run unchanged; a fired check's logits are the output, so the head that runs at
an exit replaces the final head. Calibration (Learn-then-Test) then measures the composed rule, gate and
classifier, on the calibration split: the guarantee is stated for what actually runs.

Features that read the previous layer's logit lens (`delta_*`, `kl_prev`) cannot be gated: a gated-out layer has
no lens. `GATEABLE_FEATURES` lists the others.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from .features import FEATURES

__all__ = ["GATEABLE_FEATURES", "LinearGate", "fit_linear_gate", "rms_normalize"]

GATEABLE_FEATURES = tuple(n for n, spec in FEATURES.items() if not spec.needs & {"prev_stats", "prev_log_probs"})
_EPS = 1e-6


def rms_normalize(hidden):
    """`hidden / rms(hidden)` along the last dimension (numpy or torch, computed in float32)."""
    if isinstance(hidden, torch.Tensor):
        x = hidden.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _EPS)
    x = np.asarray(hidden, dtype=np.float32)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + _EPS)


class LinearGate:
    """Per-layer linear probes on the normalised last-token hidden state (see the module docstring).

    Args:
        layers (`Sequence[int]`): the 1-based layers that have a probe; other layers are not gated.
        weight (`np.ndarray` of shape `(len(layers), hidden_size)`): probe weights.
        bias (`np.ndarray` of shape `(len(layers),)`): probe biases.
        threshold (`np.ndarray` of shape `(len(layers),)`): pass where score >= threshold (`inf` = never,
            `-inf` = always).
    """

    def __init__(self, layers, weight, bias, threshold):
        self.layers = tuple(int(k) for k in layers)
        # own read-only copies: the fingerprint and the per-device copies describe these arrays for good
        self.weight = np.array(weight, dtype=np.float32)
        self.bias = np.array(bias, dtype=np.float32).reshape(-1)
        self.threshold = np.array(threshold, dtype=np.float32).reshape(-1)
        for array in (self.weight, self.bias, self.threshold):
            array.setflags(write=False)
        n = len(self.layers)
        if n == 0 or any(k < 1 for k in self.layers) or len(set(self.layers)) != n:
            raise ValueError(f"LinearGate layers must be distinct 1-based ints; got {layers!r}.")
        if self.weight.ndim != 2 or self.weight.shape[0] != n:
            raise ValueError(f"LinearGate weight must have shape ({n}, hidden_size); got {self.weight.shape}.")
        for name, value in (("bias", self.bias), ("threshold", self.threshold)):
            if value.shape != (n,):
                raise ValueError(f"LinearGate {name} must have shape ({n},); got {value.shape}.")
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise ValueError("LinearGate weight and bias must be finite.")
        if np.isnan(self.threshold).any():
            raise ValueError("LinearGate threshold must not be NaN.")
        self._index = {k: i for i, k in enumerate(self.layers)}
        self._device_cache: dict = {}
        self._fingerprint: str | None = None

    @property
    def hidden_size(self) -> int:
        """Length of the hidden states the probes read."""
        return int(self.weight.shape[1])

    def scores(self, hidden: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Probe scores of rows `hidden` [n, H] at their 1-based `layer` [n] (`inf` where a layer has no probe)."""
        x = rms_normalize(hidden)
        layer = np.asarray(layer).reshape(-1)
        out = np.full(x.shape[0], np.inf, dtype=np.float32)
        for k, i in self._index.items():
            at = layer == k
            if at.any():
                out[at] = x[at] @ self.weight[i] + self.bias[i]
        return out

    def margins(self, hidden: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Probe score minus the layer's threshold per row (float64 [n]; `inf` at ungated layers and at layers that
        always pass, `-inf` at layers that never do): the row passes where the margin is >= 0, and passes
        `shifted(c)` where it is >= c."""
        layer = np.asarray(layer).reshape(-1)
        thr = np.full(layer.shape[0], -np.inf)
        for k, i in self._index.items():
            thr[layer == k] = self.threshold[i]
        score = self.scores(hidden, layer).astype(np.float64)
        out = np.full(layer.shape[0], np.inf)  # ungated layers (score inf) and always-passing ones (threshold -inf)
        finite = np.isfinite(thr) & np.isfinite(score)
        out[finite] = score[finite] - thr[finite]
        out[np.isposinf(thr)] = -np.inf
        return out

    def passes_table(self, hidden: np.ndarray, layer: np.ndarray) -> np.ndarray:
        """Bool [n]: the gate lets the row's check compute the head (always True at ungated layers)."""
        return self.margins(hidden, layer) >= 0

    def shifted(self, offset: float) -> LinearGate:
        """The same probes with every finite threshold raised by `offset` (`> 0`: stricter; what calibrating the
        gate as the exit rule chooses, see `training.calibrate(..., knob="gate")`)."""
        offset = float(offset)
        if not np.isfinite(offset):
            raise ValueError(f"offset must be a finite number; got {offset!r}.")
        thr = np.where(np.isfinite(self.threshold), self.threshold + np.float32(offset), self.threshold)
        return LinearGate(self.layers, self.weight, self.bias, thr)

    def passes(self, hidden: torch.Tensor, layer: int) -> torch.Tensor | None:
        """BoolTensor [n] for last-token hidden states [n, H] at 1-based `layer`; None when `layer` has no probe.

        Runs where `hidden` lives; the probe is copied to that device once.
        """
        i = self._index.get(int(layer))
        if i is None:
            return None
        key = (hidden.device, i)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = (torch.tensor(self.weight[i], device=hidden.device), float(self.bias[i]),
                      float(self.threshold[i]))
            self._device_cache[key] = cached
        w, b, t = cached
        return rms_normalize(hidden) @ w + b >= t

    def select(self, rows: torch.Tensor, hidden: torch.Tensor, layer: int):
        """`(rows, hidden)` of the rows that pass at `layer` (all of them where it has no probe), or `(None, None)`
        when none does. `rows` [n] are host batch indices, `hidden` [n, H] their last-token states; the answer costs
        one device-to-host copy of n bools, in place of an LM head."""
        passed = self.passes(hidden, layer)
        if passed is None:
            return rows, hidden
        passed_host = passed.to("cpu", torch.bool)
        if not bool(passed_host.any()):
            return None, None
        if bool(passed_host.all()):
            return rows, hidden
        return rows[passed_host], hidden[passed_host.nonzero().squeeze(-1).to(hidden.device)]

    def check_for(self, features, num_layers: int | None) -> None:
        """Raises `ValueError` when a classifier reading `features` on a model of `num_layers` cannot use the gate."""
        ungateable = [f for f in features if f not in GATEABLE_FEATURES]
        if ungateable:
            raise ValueError(f"features {ungateable} read the previous layer's logit lens, which a gated-out layer "
                             f"does not compute; a gated classifier reads only {list(GATEABLE_FEATURES)}.")
        if num_layers is not None and max(self.layers) >= num_layers:
            raise ValueError(f"the gate has a probe after layer {max(self.layers)}, but the model has {num_layers} "
                             f"layers (checks run after layers 1..{num_layers - 1}).")

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the probes' arrays: recorded in the artifact and checked on load."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for a in (np.asarray(self.layers, dtype=np.int64), self.weight, self.bias, self.threshold):
                h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def to_tensors(self, prefix: str = "gate.") -> dict[str, np.ndarray]:
        """The arrays to store (safetensors, no pickle)."""
        return {f"{prefix}layers": np.asarray(self.layers, dtype=np.int64), f"{prefix}weight": self.weight,
                f"{prefix}bias": self.bias, f"{prefix}threshold": self.threshold}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "gate.", source: str = "the gate") -> LinearGate:
        """Rebuilds a gate from `to_tensors` arrays; a missing or malformed array raises `ValueError` naming it."""
        names = ("layers", "weight", "bias", "threshold")
        missing = [n for n in names if prefix + n not in tensors]
        if missing:
            raise ValueError(f"{source}: missing gate arrays {[prefix + n for n in missing]}.")
        try:
            return cls(*(np.asarray(tensors[prefix + n]) for n in names))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def __repr__(self):
        return f"LinearGate(layers={self.layers}, hidden_size={self.hidden_size})"


def fit_linear_gate(hidden: np.ndarray, layer: np.ndarray, label: np.ndarray, layers=None, recall: float = 0.99,
                    C: float = 1.0, max_rows_per_layer: int = 4000, seed: int = 0) -> LinearGate:
    """Fits one logistic-regression probe per layer and sets each threshold to keep `recall` of the positives.

    Args:
        hidden (`np.ndarray` of shape `(rows, H)`): last-token hidden states (any float dtype; normalised here).
        layer (`np.ndarray` of shape `(rows,)`): 1-based layer of each row.
        label (`np.ndarray` of shape `(rows,)`): 1 where the layer's logit lens agrees with the target (what the
            classifier is trained on).
        layers (`Sequence[int]`, *optional*): the layers to gate (default: every layer present in `layer`).
        recall (`float`, *optional*, defaults to 0.99): fraction of each layer's positive rows the gate must pass
            on these rows. A layer with no positive row never passes; one with only positives always does.
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1]; got {recall!r}.")
    hidden = np.asarray(hidden)
    layer = np.asarray(layer).reshape(-1)
    label = np.asarray(label).reshape(-1).astype(bool)
    if hidden.ndim != 2 or hidden.shape[0] != layer.shape[0] or label.shape[0] != layer.shape[0]:
        raise ValueError(f"hidden {hidden.shape}, layer {layer.shape} and label {label.shape} must describe the "
                         "same rows.")
    layers = sorted({int(k) for k in (np.unique(layer) if layers is None else layers)})
    rng = np.random.default_rng(seed)
    H = hidden.shape[1]
    weights, biases, thresholds = [], [], []
    for k in layers:
        idx = np.flatnonzero(layer == k)
        y = label[idx]
        w, b = np.zeros(H, dtype=np.float32), 0.0
        if idx.size == 0 or not y.any():
            thr = np.inf
        elif y.all():
            thr = -np.inf
        else:
            fit_idx = idx if idx.size <= max_rows_per_layer else rng.choice(idx, max_rows_per_layer, replace=False)
            x = rms_normalize(hidden[fit_idx])
            mean, scale = x.mean(0), x.std(0) + 1e-6
            model = LogisticRegression(C=C, class_weight="balanced", max_iter=500)
            model.fit((x - mean) / scale, label[fit_idx])
            # fold the standardisation into the probe: one dot product at run time
            w = (model.coef_[0] / scale).astype(np.float32)
            b = float(model.intercept_[0] - (model.coef_[0] * mean / scale).sum())
            pos = rms_normalize(hidden[idx[y]]) @ w + b
            thr = float(np.quantile(pos, 1.0 - recall, method="lower"))
            # a little below the kept row's score, so float rounding on another device cannot drop it
            thr -= 1e-4 * (1.0 + abs(thr))
        weights.append(w)
        biases.append(b)
        thresholds.append(thr)
    return LinearGate(layers, np.stack(weights), np.asarray(biases), np.asarray(thresholds))
