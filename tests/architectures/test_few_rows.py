"""Verification's linear layers on a few rows (`architectures.few_rows`): the same products as the stock modules,
only inside the context, with the modules' hooks (lossless generation through them: `tests/runtime/test_lossless.py`)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from adainfer_hf.architectures import few_rows
from adainfer_hf.architectures.few_rows import few_rows_linear, linear_few_rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 7), (1, 3, 7), (2, 2, 7), (1, 1, 7), (1, 9, 7)])
def test_linear_few_rows_is_functional_linear(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(11, 7)
    b = torch.randn(11) if bias else None
    torch.testing.assert_close(linear_few_rows(x, w, b), nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-6)


def _spy(monkeypatch):
    monkeypatch.setattr(few_rows, "KERNEL", "product")  # the form fixed: what is routed, not which form is faster
    calls = []
    real = few_rows.linear_few_rows

    def spy(x, w, b=None):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(few_rows, "linear_few_rows", spy)
    return calls


def test_only_large_plain_linears_with_few_rows_inside_the_context(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 64)
    big, small = nn.Linear(16, 8), nn.Linear(4, 4)
    seen = []
    big.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    block = nn.Sequential(big, nn.ReLU())
    with torch.no_grad():
        ref = block(torch.ones(1, 3, 16))
        with few_rows_linear(block):
            out = block(torch.ones(1, 3, 16))  # 3 rows: the product
            block(torch.ones(1, 9, 16))  # 9 rows: MKL's linear
            small(torch.ones(3, 4))  # outside the module given
        block(torch.ones(1, 3, 16))  # after the context
    torch.testing.assert_close(out, ref)
    assert calls == [(1, 3, 16)] and len(seen) == 4  # the hook ran every time
    assert "forward" not in big.__dict__
    with few_rows_linear(block):
        block(torch.ones(1, 3, 16))  # gradients enabled: the module's own path
    assert calls == [(1, 3, 16)]


def test_a_replaced_forward_and_the_disabled_context_are_left_alone(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 1)
    layer = nn.Linear(6, 6)
    own = layer.forward
    layer.forward = lambda x: own(x) * 1  # what accelerate's dispatch does: an instance forward
    with torch.no_grad(), few_rows_linear(layer):
        layer(torch.ones(2, 6))
    assert calls == [] and "forward" in layer.__dict__
    del layer.forward
    with torch.no_grad(), few_rows_linear(layer, enabled=False):
        layer(torch.ones(2, 6))
    assert calls == []


def _slow(seconds, fn):
    def slow(*args):
        time.sleep(seconds)
        return fn(*args)
    return slow


@pytest.mark.parametrize("slow_form", ["product", "linear"])
def test_auto_keeps_the_faster_form_per_shape_and_rows(slow_form, monkeypatch):
    """KERNEL="auto" times both forms at a key's first call and keeps the faster one; a slowed form is not
    chosen, the choice is remembered per (shape, rows), and the output is the stock linear's either way."""
    monkeypatch.setattr(few_rows, "KERNEL", "auto")
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 1)
    name = "linear_few_rows" if slow_form == "product" else "_stock_linear"
    monkeypatch.setattr(few_rows, name, _slow(0.004, getattr(few_rows, name)))
    few_rows.clear_kernel_choices()
    torch.manual_seed(0)
    layer = nn.Linear(16, 32)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = nn.functional.linear(x, layer.weight, layer.bias)
        with few_rows_linear(layer):
            out = layer(x)
            layer(torch.randn(2, 16))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    chosen = few_rows.kernel_choices()
    fast = "linear" if slow_form == "product" else "product"
    assert sorted(key[2] for key in chosen) == [2, 3]
    assert set(chosen.values()) == {fast}
    few_rows.clear_kernel_choices()
    assert few_rows.kernel_choices() == {}


def test_a_bad_kernel_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(few_rows, "KERNEL", "fastest")
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 1)
    layer = nn.Linear(4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="'fastest'.*auto"), few_rows_linear(layer):
        layer(torch.ones(2, 4))
