"""Linear layers on a few rows, as lossless verification runs them on the CPU.

A verification step runs a decoder layer (and the LM head) on the owed draft positions and the current one: a
few rows. On the CPU, `torch.nn.functional.linear` (MKL's `x @ W.T`) on 2-5 rows of a large weight costs
1.5-3.3 times one row (which takes a matrix-vector kernel), while the product `W @ x.T` streams the weight once
and costs 0.45-1.5 times one row (fp32, 2 threads: Qwen2.5's MLP weights, the 49k-262k-row LM heads); from 6 rows
on MKL's linear is as fast. Batching positions pays only with the second form.

`few_rows_linear(module)` is a context in which the plain `nn.Linear` layers inside `module` with a large fp32 CPU
weight compute 2-`MAX_FEW_ROWS` rows that way (their forward hooks still run; a module whose forward is already
replaced, e.g. by accelerate's dispatch, is left alone). It changes only the order of the fp32 sums (the last
bits), as another kernel would. Swapping the modules' forward for the call costs microseconds; a
`TorchFunctionMode` doing the same cost about 0.25 ms per decoder layer (every op through Python). Another thread
calling the same module meanwhile gets the same product. The thresholds were measured on one CPU (AVX-512, MKL);
on another the drafting cost model, which times the kernels verification runs, decides whether drafts pay.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

__all__ = ["MAX_FEW_ROWS", "MIN_WEIGHT_ELEMENTS", "few_rows_linear", "linear_few_rows"]

MAX_FEW_ROWS = 5  # from 6 rows on MKL's linear is as fast or faster (a prompt forward stays on it)
MIN_WEIGHT_ELEMENTS = 1 << 20  # smaller weights stay in cache: either form is as fast


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)` computed as `(weight @ x.T).T` (`x` [..., in])."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.matmul(weight, flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _few_rows_forward(module: nn.Linear, x: torch.Tensor, max_rows: int = MAX_FEW_ROWS) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if 2 <= rows <= max_rows and x.dtype == module.weight.dtype and not torch.is_grad_enabled():
        return linear_few_rows(x, module.weight, module.bias)
    return nn.functional.linear(x, module.weight, module.bias)


def _routable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= MIN_WEIGHT_ELEMENTS


@contextlib.contextmanager
def few_rows_linear(module: nn.Module, enabled: bool = True, max_rows: int = MAX_FEW_ROWS):
    """Within the context, `module`'s large fp32 CPU `nn.Linear` layers (`module` itself included) compute
    2-`max_rows` rows as [`linear_few_rows`] (without gradients only); their own forward is back on exit.
    `enabled=False`: a no-op."""
    swapped = [m for m in module.modules() if _routable(m)] if enabled else []
    for m in swapped:
        m.forward = functools.partial(_few_rows_forward, m, max_rows=max_rows)
    try:
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
