"""What one exit check costs on the model's device, in decoder layers (the input of schedule choice).

A check (final norm + LM head + top-2 on the last token) is timed against one decoder layer, in a prompt forward
("prefill") or in a single-token step ("decode"), with the LM head in the dtype the checks will use. A gate in
front of the checks (`policy.gate.LinearGate`) is timed the same way, with its one device-to-host sync.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..architectures.devices import execution_device
from ..architectures.head import head_of
from ..policy.base import check_vocabulary_or_raise
from ..policy.features import compute_features

__all__ = ["LayerClock", "measure_check_cost", "measure_gate_cost"]


class LayerClock:
    """Times callables against one decoder layer of `model` run on a random `[batch, q, H]` input."""

    def __init__(self, model, seq_len: int, batch_size: int, phase: str, repeats: int):
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode'; got {phase!r}.")
        spec = head_of(model).spec
        self.layer = spec.decoder_layers(model)[0]
        self.device = execution_device(self.layer)
        dtype = next(self.layer.parameters()).dtype
        q = seq_len if phase == "prefill" else 1
        self.hidden = torch.randn(batch_size, q, model.config.hidden_size, device=self.device, dtype=dtype)
        pos = torch.arange(q, device=self.device).unsqueeze(0)
        self.kwargs = {"position_ids": pos}
        pe = spec.position_embeddings(model, self.hidden, pos)
        if pe is not None:
            self.kwargs["position_embeddings"] = pe
        self.repeats = repeats

    def median_time(self, fn) -> float:
        fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def in_layers(self, fn) -> float:
        """Median time of `fn()` over the median time of the layer."""
        return self.median_time(fn) / self.median_time(lambda: self.layer(self.hidden, attention_mask=None,
                                                                          **self.kwargs))


@torch.no_grad()
def measure_check_cost(model, seq_len: int = 256, batch_size: int = 1, phase: str = "prefill",
                       features=("gap", "top_prob"), repeats: int = 7, check_dtype: str | None = None,
                       check_vocabulary=None) -> float:
    """Measured cost of one exit check in decoder layers, on the model's device and dtype.

    Args:
        phase (`str`): "prefill" (a layer runs `seq_len` tokens) or "decode" (a layer runs one token).
        check_dtype (`str`, *optional*): the LM-head dtype the checks use (see `policy.CHECK_DTYPES`).
        check_vocabulary (`Sequence[int]`, *optional*): the token ids the checks score (None: all).
    """
    clock = LayerClock(model, seq_len, batch_size, phase, repeats)
    head_dtype = None if check_dtype is None else getattr(torch, check_dtype)
    head = head_of(model)
    index = None if check_vocabulary is None else head.vocabulary(
        check_vocabulary_or_raise(check_vocabulary, head.width))

    def run_check():
        logits = head.logits(clock.hidden[:, -1], head_dtype, index)
        feats, _ = compute_features(features, logits)
        feats.to("cpu")  # the decision's one device-to-host sync

    with head.session():  # as inside a forward: the kept copies are verified once, not at every check
        return clock.in_layers(run_check)


@torch.no_grad()
def measure_gate_cost(model, gate, seq_len: int = 256, batch_size: int = 1, phase: str = "decode",
                      repeats: int = 7) -> float:
    """Measured cost of `gate` (a `LinearGate`) in front of one check, in decoder layers, as the decoder loop runs
    it: the probe on the rows' last-token hidden states and the one device-to-host copy of its answer."""
    clock = LayerClock(model, seq_len, batch_size, phase, repeats)
    layer = gate.layers[0]

    def run_gate():
        gate.passes(clock.hidden[:, -1], layer).to("cpu")

    return clock.in_layers(run_gate)
