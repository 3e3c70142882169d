"""Verification's linear layers on a few rows (`architectures.few_rows`): the same products as the stock modules,
only inside the context, with the modules' hooks (lossless generation through them: `tests/runtime/test_lossless.py`)."""

from __future__ import annotations

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
