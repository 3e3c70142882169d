"""Linear layers on a few rows, as lossless verification runs them on the CPU.

A verification step runs a decoder layer (and the LM head) on the owed draft positions and the current one: a
few rows. On some CPUs `torch.nn.functional.linear` (MKL's `x @ W.T`) on 2-5 rows of a large weight costs
1.5-3.3 times one row (which takes a matrix-vector kernel), while the product `W @ x.T` streams the weight once
and costs 0.45-1.5 times one row (fp32, 2 threads, AMD EPYC: Qwen2.5's MLP weights, the 49k-262k-row LM heads);
from 6 rows on MKL's linear is as fast. Batching positions pays there only with the second form.

`few_rows_linear(module)` is a context in which the plain `nn.Linear` layers inside `module` with a large fp32 CPU
weight compute 2-`MAX_FEW_ROWS` rows that way (their forward hooks still run; a module whose forward is already
replaced, e.g. by accelerate's dispatch, is left alone). It changes only the order of the fp32 sums (the last
bits), as another kernel would. Swapping the modules' forward for the call costs microseconds; a
`TorchFunctionMode` doing the same cost about 0.25 ms per decoder layer (every op through Python). Another thread
calling the same module meanwhile gets the same product.

Which form is faster depends on the CPU and its BLAS: on one machine (AMD EPYC, MKL) the product won 2-5 rows of
every large weight, on another (Intel Xeon, AVX-512) MKL's linear on 2-3 rows of a 152k-row head cost the same as
one row and the product twice that. So by default (`KERNEL = "auto"`) the first call of each (weight shape,
dtype, rows, bias, threads) times both forms on its own input (`utils.timing.alternating_medians`: a warm-up, then
three alternating rounds), keeps the one with the lower median, and uses it from then on (`kernel_choices()` lists
the decisions, `clear_kernel_choices()` forgets them).
The choice depends on shapes only, never on the weight's values, so an edited or merged weight keeps it. Tuning
on a loaded machine can choose wrongly (other threads stall the multi-threaded kernel): set
`ADAINFER_FEW_ROWS_KERNEL=product` or `=linear` (or `few_rows.KERNEL`) to fix the form. The drafting cost model
times verification through this same routing, so what it measures is what decoding then runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
from torch import nn

from ..utils.timing import alternating_medians

__all__ = ["KERNEL", "KERNELS", "MAX_FEW_ROWS", "MIN_WEIGHT_ELEMENTS", "clear_kernel_choices", "few_rows_linear",
           "kernel_choices", "linear_few_rows"]

MAX_FEW_ROWS = 5  # from 6 rows on MKL's linear is as fast or faster (a prompt forward stays on it)
MIN_WEIGHT_ELEMENTS = 1 << 20  # smaller weights stay in cache: either form is as fast
KERNELS = ("auto", "product", "linear")
KERNEL = os.environ.get("ADAINFER_FEW_ROWS_KERNEL", "auto")  # read as each context opens: tests and users may set it
TUNE_ROUNDS = 3  # rounds of both forms timed at a key's first use (the lower median wins)

_choices: dict[tuple, str] = {}
_choices_lock = threading.Lock()


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)` computed as `(weight @ x.T).T` (`x` [..., in])."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.matmul(weight, flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _stock_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return nn.functional.linear(x, weight, bias)


def kernel_choices() -> dict[tuple, str]:
    """The forms `KERNEL="auto"` chose so far: {(weight shape, dtype, rows, has bias, threads): "product" or
    "linear"}."""
    with _choices_lock:
        return dict(_choices)


def clear_kernel_choices() -> None:
    """Forget the tuned choices (the next call of each key times both forms again)."""
    with _choices_lock:
        _choices.clear()


def _resolve_kernel() -> str:
    if KERNEL not in KERNELS:
        raise ValueError(f"few_rows.KERNEL (or ADAINFER_FEW_ROWS_KERNEL) is {KERNEL!r}; expected one of {KERNELS}")
    return KERNEL


def _tuned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, threads: int) -> str:
    key = (tuple(weight.shape), weight.dtype, rows, bias is not None, threads)
    choice = _choices.get(key)
    if choice is None:
        seconds = alternating_medians({"product": lambda: linear_few_rows(x, weight, bias),
                                       "linear": lambda: _stock_linear(x, weight, bias)},
                                      TUNE_ROUNDS, x.device)
        with _choices_lock:
            choice = _choices.setdefault(key, min(seconds, key=seconds.get))
    return choice


def _few_rows_forward(module: nn.Linear, x: torch.Tensor, max_rows: int, kernel: str, threads: int) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if (kernel != "linear" and 2 <= rows <= max_rows and x.dtype == module.weight.dtype
            and not torch.is_grad_enabled()):
        if kernel == "product" or _tuned(x, module.weight, module.bias, rows, threads) == "product":
            return linear_few_rows(x, module.weight, module.bias)
    return _stock_linear(x, module.weight, module.bias)


def _routable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= MIN_WEIGHT_ELEMENTS


@contextlib.contextmanager
def few_rows_linear(module: nn.Module, enabled: bool = True, max_rows: int = MAX_FEW_ROWS):
    """Within the context, `module`'s large fp32 CPU `nn.Linear` layers (`module` itself included) compute
    2-`max_rows` rows as [`linear_few_rows`] or as MKL's linear, whichever `KERNEL` says (by default the faster,
    timed at first use; without gradients only); their own forward is back on exit. `enabled=False`: a no-op."""
    swapped = [m for m in module.modules() if _routable(m)] if enabled else []
    if swapped:
        kernel, threads = _resolve_kernel(), torch.get_num_threads()
    for m in swapped:
        m.forward = functools.partial(_few_rows_forward, m, max_rows=max_rows, kernel=kernel, threads=threads)
    try:
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
