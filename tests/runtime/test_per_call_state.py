"""Per-call state stays per call: sub-layer features across threads, full-batch attentions with per-row exits,
per-call policies checked as the setter checks them."""

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
