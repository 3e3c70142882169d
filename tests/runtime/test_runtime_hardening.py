"""Hardening of the exit loop and the drop-in surface: each test compares against the stock class or states the
documented refusal."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit


class NeverExit(ExitPolicy):
    """Checks after every layer and never fires (the loop runs, the output must be the stock model's)."""

    features = ("gap", "top_prob")

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def _gen_kwargs(**kw):
    return dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)


# ---------------------------------------------------------------- 1. use_cache=False means no cache
@pytest.mark.parametrize("exit_cache", ["propagate", "exact"])
def test_generate_use_cache_false_installs_no_cache(exit_cache):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ref = stock.generate(ids, attention_mask=mask, **_gen_kwargs(use_cache=False))
    out = ada.generate(ids, attention_mask=mask, exit_cache=exit_cache, exit_policy=NeverExit(),
                       **_gen_kwargs(use_cache=False))
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- 3. the eager fill follows the real modules
def _eager_vs_propagate(ada, ids, mask, k=2):
    """Logits of a step after a prompt whose rows all exited at `k`: eager fill (DynamicCache) vs deferred fill."""
    from transformers import DynamicCache

    from adainfer_hf import PropagateExitCache

    outs = []
    for cache in (DynamicCache(config=ada.config), PropagateExitCache(config=ada.config)):
        with torch.no_grad():
            ada(ids, attention_mask=mask, past_key_values=cache, exit_policy=ScriptedExit(k))
            nxt = torch.full((ids.shape[0], 1), 5)
            m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            outs.append(ada(nxt, attention_mask=m2, past_key_values=cache, exit_policy=None).logits)
    return outs


def test_eager_fill_sees_in_place_norm_edits():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    _eager_vs_propagate(ada, ids, mask)  # builds (and caches) the fused fill weight
    with torch.no_grad():
        for layer in ada.model.layers:
            layer.input_layernorm.weight.mul_(3.0)
    eager, deferred = _eager_vs_propagate(ada, ids, mask)
    torch.testing.assert_close(eager, deferred)


def test_eager_fill_with_peft_lora_matches_merged_model():
    """LoRA on k_proj/v_proj (nonzero B): the fill must see the adapter, as the merged model's weights do."""
    import copy

    peft = pytest.importorskip("peft")
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(ada, cfg).eval()
    merged = copy.deepcopy(wrapped).merge_and_unload().eval()
    ref_eager, ref_deferred = _eager_vs_propagate(merged, ids, mask)
    torch.testing.assert_close(ref_eager, ref_deferred, rtol=1e-4, atol=1e-4)
    eager, deferred = _eager_vs_propagate(wrapped.base_model.model, ids, mask)
    torch.testing.assert_close(eager, ref_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deferred, ref_eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 4. per-call state stays per call across threads
class RecordingNeverExit(NeverExit):
    features = ("cos_attn", "cos_mlp")

    def __init__(self):
        self.seen = []

    def record(self, layer, rows, features, stats, logits):
        self.seen.append(features.clone())


def test_sublayer_features_are_per_call_across_threads():
    import threading

    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    other = torch.randint(3, 99, (5, 13))
    reference = RecordingNeverExit()
    with torch.no_grad():
        ada(ids, attention_mask=mask, exit_policy=reference)
    errors, results = [], []
    stop = threading.Event()

    def plain_forwards():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    ada(other, exit_policy=None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def exit_forwards():
        try:
            with torch.no_grad():
                for _ in range(5):
                    policy = RecordingNeverExit()
                    ada(ids, attention_mask=mask, exit_policy=policy)
                    results.append(policy.seen)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=plain_forwards), threading.Thread(target=exit_forwards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seen in results:
        for got, want in zip(seen, reference.seen, strict=True):
            torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- 5. output_attentions with per-row exits
@pytest.mark.parametrize("use_cache", [False, True])
def test_output_attentions_are_full_batch_with_per_row_exits(use_cache):
    stock, ada = make_pair("llama_gqa", attn="eager")
    ids, mask = batch("left")
    exit_after = [1, 3, 4]  # row 0 exits after layer 1, row 1 after layer 3, row 2 runs all 4
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_attentions=True, use_cache=use_cache).attentions
        out = ada(ids, attention_mask=mask, output_attentions=True, use_cache=use_cache,
                  exit_policy=ScriptedExit(exit_after)).attentions
    assert len(out) == len(ref) == 4
    for layer, (got, want) in enumerate(zip(out, ref, strict=True), start=1):
        assert got.shape == want.shape
        for row, k in enumerate(exit_after):
            if layer <= k:
                torch.testing.assert_close(got[row], want[row])
            else:
                assert not got[row].any()  # rows that exited did not run this layer: zeros


# ---------------------------------------------------------------- 6. flex attention is refused, never a crash
def test_flex_attention_with_a_policy_is_refused_before_running():
    """Row subsets do not slice flex attention's block mask (before the fix the process died of SIGFPE, seen in a
    subprocess); now refused before any layer runs, so the check runs in-process."""
    _, ada = make_pair("llama_gqa", attn="flex_attention")
    ids, mask = batch("none")
    with pytest.raises(ValueError, match="flex_attention"), torch.no_grad():
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]))


# ---------------------------------------------------------------- 7. drop-in: every generate option without a policy
def _assistant():
    stock, _ = make_pair("llama_gqa", seed=3)
    return stock


@pytest.mark.parametrize("option", ["static_cache", "assistant", "prompt_lookup"])
def test_generate_options_without_a_policy_match_stock(option):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none", batch_size=1)
    extra = {"static_cache": dict(cache_implementation="static"),
             "assistant": dict(assistant_model=_assistant()),
             "prompt_lookup": dict(prompt_lookup_num_tokens=2)}[option]
    ref = stock.generate(ids, attention_mask=mask, **_gen_kwargs(**extra))
    out = ada.generate(ids, attention_mask=mask, **_gen_kwargs(**extra))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("option", ["cache_implementation", "assistant_model", "prompt_lookup_num_tokens"])
def test_generate_options_with_a_policy_are_refused_by_name(option):
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("none", batch_size=1)
    value = {"cache_implementation": "static", "assistant_model": _assistant(), "prompt_lookup_num_tokens": 2}
    with pytest.raises(ValueError, match=option):
        ada.generate(ids, attention_mask=mask, exit_policy=ScriptedExit(2), **_gen_kwargs(**{option: value[option]}))


def test_return_dict_false_returns_tuples():
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, return_dict=False)
        out = ada(ids, attention_mask=mask, return_dict=False)
        assert isinstance(out, tuple) and len(out) == len(ref)
        torch.testing.assert_close(out[0], ref[0])
        as_dict = ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]))
        as_tuple = ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 3, 4]), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    assert torch.equal(as_tuple[-1], as_dict.exit_layers)


# ---------------------------------------------------------------- 8. per-call policies are checked as the setter does
def test_per_call_classifier_made_for_another_model_is_refused():
    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.policy.classifier import ExitClassifier

    _, ada = make_pair("llama_gqa")
    _, other = make_pair("llama_gqa", seed=7)
    ids, mask = batch("left")
    clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]])).bind(other)
    with pytest.raises(ValueError, match="fingerprint"):
        ada(ids, attention_mask=mask, exit_policy=clf)
    with pytest.raises(ValueError, match="fingerprint"):
        ada.generate(ids, attention_mask=mask, exit_policy=clf, **_gen_kwargs())


def test_per_call_policy_of_the_wrong_type_is_a_type_error():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    with pytest.raises(TypeError, match="int"):
        ada(ids, attention_mask=mask, exit_policy=123)
    with pytest.raises(TypeError, match="int"):
        ada.generate(ids, attention_mask=mask, exit_policy=123, **_gen_kwargs())


def test_per_call_policy_made_for_another_model_is_refused():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")

    class BoundElsewhere(NeverExit):
        def validate_for(self, model, ignore_mismatch=False):
            if model is not owner:
                raise ValueError("made for another model")

    owner = object()
    with pytest.raises(ValueError, match="another model"):
        ada(ids, attention_mask=mask, exit_policy=BoundElsewhere())
    with pytest.raises(ValueError, match="another model"):
        ada.generate(ids, attention_mask=mask, exit_policy=BoundElsewhere(), **_gen_kwargs())


# ---------------------------------------------------------------- 9. training computes every layer
def _grads(model, ids, mask, **kw):
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids, **kw).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [NeverExit(), ScriptedExit(1)], ids=["never", "scripted1"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_training_with_a_classifier_and_checkpointing_has_stock_gradients(reentrant, policy):
    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ref = _grads(stock.train(), ids, mask)
    ada.exit_classifier = policy
    ada.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = _grads(ada.train(), ids, mask)
    assert got.keys() == ref.keys()
    for name, grad in ref.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_explicit_exit_policy_with_checkpointing_in_training_is_refused():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    ada.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ada.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ada(ids, attention_mask=mask, labels=ids, exit_policy=ScriptedExit(2))
    with torch.no_grad(), pytest.raises(ValueError, match="gradient checkpointing"):
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit(2))  # 5.23's checkpointing drops the cache here too
    with torch.no_grad():  # eval mode: checkpointing is inactive, the explicit policy runs
        assert ada.eval()(ids, attention_mask=mask, exit_policy=ScriptedExit(2)).exit_layers.tolist() == [2, 2, 2]


# ---------------------------------------------------------------- 10. policy arguments are refused by value
@pytest.mark.parametrize("value", [True, 1.0, [2, False], "3"])
def test_scripted_exit_refuses_non_int_layers_by_value(value):
    with pytest.raises(ValueError, match=f"exit_layer.*{value!r}".replace("[", r"\[")):
        ScriptedExit(value)


def test_scripted_exit_per_row_list_of_the_wrong_length_is_refused():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")  # 3 rows
    with pytest.raises(ValueError, match="2 layers.*3 rows"):
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 2]))
    with torch.no_grad():
        assert ada(ids, attention_mask=mask, exit_policy=ScriptedExit([2])).exit_layers.tolist() == [2, 2, 2]


# ---------------------------------------------------------------- 9. non-finite features never exit
def _classifier(kind):
    import numpy as np
    from sklearn.svm import SVC, LinearSVC

    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.policy.classifier import ExitClassifier

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (200, 2))
    y = (X[:, 0] > 0.5).astype(int)
    est = {"linear": LinearSVC(), "svc_rbf": SVC(kernel="rbf"), "gap_rule": GapThresholdRule(threshold=0.5)}[kind]
    return ExitClassifier(est.fit(X, y))


@pytest.mark.parametrize("kind", ["linear", "svc_rbf", "gap_rule"])
def test_non_finite_feature_rows_never_exit_and_warn_once(kind):
    import warnings

    clf = _classifier(kind)
    clean = torch.tensor([[0.9, 0.95], [0.1, 0.2], [0.8, 0.9], [0.95, 0.99], [0.9, 0.9]])
    feats = clean.clone()
    feats[0, 1] = float("nan")
    feats[2, 0] = float("inf")
    feats[4, 1] = float("-inf")
    rows = torch.arange(len(feats))
    expected = clf.decide(clean, 2, rows)
    assert expected.tolist() == [True, False, True, True, True]  # the clean rows exercise both outcomes
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = clf.decide(feats, 2, rows)
        again = clf.decide(feats, 3, rows)
    assert got.tolist() == again.tolist() == [False, False, False, True, False]
    non_finite = [w for w in record if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]
    assert len(non_finite) == 1, [str(w.message) for w in record]
    assert clf.decide(clean, 2, rows).tolist() == expected.tolist()


# ---------------------------------------------------------------- 10. classifier arguments are refused by value
def test_string_labels_are_refused_naming_the_classes():
    import numpy as np
    from sklearn.base import BaseEstimator
    from sklearn.svm import LinearSVC

    from adainfer_hf.policy.classifier import ExitClassifier

    X = np.random.default_rng(0).uniform(0, 1, (50, 2))
    est = LinearSVC().fit(X, np.where(X[:, 0] > 0.5, "yes", "no"))
    with pytest.raises(ValueError, match=r"\['no', 'yes'\].*0/1 or bool"):
        ExitClassifier(est)

    class NoClasses(BaseEstimator):  # an estimator without `classes_` whose predictions are strings
        def fit(self, X, y=None):
            self.n_features_in_ = 2
            return self

        def predict(self, X):
            return np.where(np.asarray(X)[:, 0] > 0.5, "yes", "no")

    clf = ExitClassifier(NoClasses().fit(X))
    with pytest.raises(ValueError, match=r"'no'.*'yes'.*0/1 or bool"):
        clf.decide(torch.tensor([[0.9, 0.9], [0.1, 0.1]]), 1, torch.arange(2))


def test_unbound_min_layer_beyond_the_model_is_refused_naming_both():
    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.policy.classifier import ExitClassifier

    _, ada = make_pair("llama_gqa")  # 4 layers
    ids, mask = batch("left")
    clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]]), min_layer=99)
    with pytest.raises(ValueError, match=r"min_layer=99.*4 decoder layers"):
        ada(ids, attention_mask=mask, exit_policy=clf)
    with pytest.raises(ValueError, match=r"min_layer=99.*4 decoder layers"):
        ada.exit_classifier = clf
    edge = clf.replace(min_layer=4)
    with pytest.raises(ValueError, match=r"min_layer=4.*4 decoder layers"):
        ada(ids, attention_mask=mask, exit_policy=edge)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_non_finite_screen_on_cuda_does_not_synchronise_and_warns_later():
    clf = _classifier("linear")
    feats = torch.tensor([[0.9, float("nan")], [0.9, 0.95]], device="cuda")
    rows = torch.arange(2, device="cuda")
    clf.decide(feats[1:], 1, rows[:1])  # builds the cached device weights (a host-to-device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = clf.decide(feats, 1, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.cpu().tolist() == [False, True]
    torch.cuda.synchronize()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        clf.decide(feats[1:], 2, rows[:1])  # the flag of the previous call has landed: warned now
