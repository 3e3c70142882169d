"""What one exit check costs on the model's device, in decoder layers (the input of schedule choice).

A check (final norm + LM head + top-2 on the last token) is timed against one decoder layer, in a prompt forward
("prefill") or in a single-token step ("decode"), with the LM head in the dtype the checks will use.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..architectures import core as arch
from ..policy.features import compute_features

__all__ = ["measure_check_cost"]


@torch.no_grad()
def measure_check_cost(model, seq_len: int = 256, batch_size: int = 1, phase: str = "prefill",
                       features=("gap", "top_prob"), repeats: int = 7, check_dtype: str | None = None) -> float:
    """Measured cost of one exit check in decoder layers, on the model's device and dtype.

    Args:
        phase (`str`): "prefill" (a layer runs `seq_len` tokens) or "decode" (a layer runs one token).
        check_dtype (`str`, *optional*): the LM-head dtype the checks use (see `policy.CHECK_DTYPES`).
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode'; got {phase!r}.")
    layer = arch.decoder_layers(model)[0]
    device = arch.execution_device(layer)
    dtype = next(layer.parameters()).dtype
    q = seq_len if phase == "prefill" else 1
    hidden = torch.randn(batch_size, q, model.config.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(q, device=device).unsqueeze(0)
    kw = {"position_ids": pos}
    pe = arch.position_embeddings(model, hidden, pos)
    if pe is not None:
        kw["position_embeddings"] = pe

    def run_layer():
        layer(hidden, attention_mask=None, **kw)

    head_dtype = None if check_dtype is None else getattr(torch, check_dtype)

    def run_check():
        logits = arch.exit_logits(model, hidden[:, -1], head_dtype)
        feats, _ = compute_features(features, logits)
        feats.to("cpu")  # the decision's one device-to-host sync

    def median_time(fn):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return median_time(run_check) / median_time(run_layer)
