"""Contract tests: each upstream internal in `adainfer_hf.compat` against the stock code it mirrors, the run-time
cache guard, both cache argument names, and proof that a broken shim is caught."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import batch, make_pair, truncated_stock

from adainfer_hf import ScriptedExit, compat, doctor
from adainfer_hf.cache.base import CacheConsistencyError
from adainfer_hf.cli.main import main as cli_main
from adainfer_hf.compat import output_cache


@pytest.mark.parametrize("name", list(doctor.CHECKS))
def test_contract_holds_on_the_installed_release(name):
    doctor.CHECKS[name]()


def test_doctor_command_reports_every_check(capsys):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert compat.TRANSFORMERS_VERSION in out
    assert out.count("[ok]") == len(doctor.CHECKS)


def test_cache_argument_matches_the_installed_signature():
    import inspect

    from transformers.models.llama.modeling_llama import LlamaModel

    assert compat.CACHE_ARG in inspect.signature(LlamaModel.forward).parameters


# ---------------------------------------------------------------------------------------- a broken shim is caught
def _blind_layer_cache(kwargs):
    """What our hook did on 5.24 before the fix: look for the cache under the other release's name only."""
    other = "past_key_values" if compat.CACHE_ARG == "cache" else "cache"
    return kwargs.get(other)


def test_broken_cache_lookup_fails_the_contract_and_the_guard(monkeypatch):
    monkeypatch.setattr(compat, "layer_cache", _blind_layer_cache)
    with pytest.raises(AssertionError, match="compat.layer_cache"):
        doctor.check_layer_cache_argument()
    # The loop no longer sees the cache: skipped layers stay short, and the guard refuses to return that cache.
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    with pytest.raises(CacheConsistencyError, match=compat.TRANSFORMERS_VERSION), torch.no_grad():
        ada(ids, attention_mask=mask, use_cache=True, exit_policy=ScriptedExit(2))


def test_broken_rotary_fails_the_propagation_contract(monkeypatch):
    monkeypatch.setattr(compat, "rotate_keys", lambda keys, cos, sin: keys)
    with pytest.raises(AssertionError, match="propagated keys"):
        doctor.check_propagated_kv_llama()


def test_broken_output_field_fails_the_model_contract(monkeypatch):
    monkeypatch.setattr(compat, "OUTPUT_CACHE_FIELD", "no_such_field")
    with pytest.raises(AssertionError, match="no_such_field"):
        doctor.check_model_cache_argument()


def test_hook_lookup_that_ignores_sequential_hooks_fails_the_offload_contract(monkeypatch):
    monkeypatch.setattr(compat, "offload_weights_map", lambda m: getattr(getattr(m, "_hf_hook", None),
                                                                           "weights_map", None))
    with pytest.raises(AssertionError, match="weights map"):
        doctor.check_accelerate_offload_hook()


def test_svc_state_missing_a_private_array_fails_the_codec_contract(monkeypatch):
    monkeypatch.setattr(compat, "SVC_FITTED_ARRAYS", tuple(a for a in compat.SVC_FITTED_ARRAYS if a != "_dual_coef_"))
    with pytest.raises((AssertionError, AttributeError, ValueError)):
        doctor.check_svc_fitted_state()


def test_doctor_exits_non_zero_and_names_the_failure(monkeypatch, capsys):
    monkeypatch.setattr(compat, "rotate_keys", lambda keys, cos, sin: keys)
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "[FAIL] propagated K/V == stock attention's cache write (llama)" in out


# ---------------------------------------------------------------------------------------- both argument names
@pytest.mark.parametrize("name", compat.CACHE_ARG_NAMES)
def test_forward_takes_the_cache_under_either_name_without_warnings(name):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with torch.no_grad():
        ref = truncated_stock(stock, 2)(ids, attention_mask=mask).logits[:, -1:]
        cache = compat.DynamicCache(config=ada.config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = ada(ids, attention_mask=mask, use_cache=True, exit_policy=ScriptedExit(2), logits_to_keep=1,
                      **{name: cache})
    assert output_cache(out) is cache
    assert [cache.get_seq_length(i) for i in range(4)] == [ids.shape[1]] * 4
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_forward_refuses_the_cache_under_both_names():
    _, ada = make_pair("llama_gqa")
    ids, _ = batch("none")
    with pytest.raises(ValueError, match="both"):
        ada(ids, cache=compat.DynamicCache(), past_key_values=compat.DynamicCache())


@pytest.mark.parametrize("name", compat.CACHE_ARG_NAMES)
def test_generate_takes_a_user_cache_under_either_name(name):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = stock.generate(ids, **kw)
        cache = compat.DynamicCache(config=ada.config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = ada.generate(ids, exit_policy=None, **{name: cache}, **kw)
    torch.testing.assert_close(out, ref)
    assert cache.get_seq_length(3) == out.shape[1] - 1


# ------------------------------------------------------------------- generation and estimator shims: a break is caught
def test_broken_generation_shims_fail_their_contracts(monkeypatch):
    from adainfer_hf import doctor_generation as checks

    other = "past_key_values" if compat.GENERATE_CACHE_FIELD == "cache" else "cache"
    cases = [
        ("GENERATE_CACHE_FIELD", other, checks.check_generate_cache_field, "DynamicCache"),
        ("special_token_tensors", lambda config: (None, None), checks.check_custom_generate_callable,
         "special_token_tensors"),
        ("record_past", lambda cache: None, checks.check_sliding_crop_after_recording, "activate_past_recording"),
        ("validate_estimator_params", lambda estimator: None, checks.check_estimator_param_validation,
         "passed validation"),
    ]
    for name, broken, check, message in cases:
        with monkeypatch.context() as patch:
            patch.setattr(compat, name, broken)
            with pytest.raises((AssertionError, RuntimeError), match=message):
                check()
        check()  # and it holds again once restored


def test_a_crop_that_keeps_the_count_instead_fails_the_contract(monkeypatch):
    """crop's argument is a count of positions to remove when negative; reading it as a length to keep (the
    legacy meaning of a positive value) must not pass."""
    from adainfer_hf import doctor_generation as checks

    real = compat.DynamicCache.crop
    monkeypatch.setattr(compat.DynamicCache, "crop", lambda self, n: real(self, n - 1 if n < 0 else n))
    with pytest.raises(AssertionError, match="crop"):
        checks.check_sliding_crop_after_recording()
