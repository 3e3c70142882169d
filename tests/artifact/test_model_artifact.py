"""The exit classifier beside the weights: save/load pickup, Hub push of both, mismatch errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from tiny_models import batch, make_pair

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier
from adainfer_hf.artifact.constants import CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME


def _classifier(model, min_layer=2):
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(200, 2))
    y = (X[:, 1] > 0.02).astype(int)  # fires almost always: the tiny model's top_prob is small but positive
    return ExitClassifier(LogisticRegression().fit(X, y), min_layer=min_layer).bind(model)


def _outputs(model):
    ids, mask = batch("left")
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False)


def test_save_pretrained_writes_artifact_and_from_pretrained_picks_it_up(tmp_path):
    _, ada = make_pair("llama_gqa")
    ada.exit_classifier = _classifier(ada)
    before = _outputs(ada)
    assert before.exit_layers.tolist() == [2, 2, 2]
    ada.save_pretrained(tmp_path)
    assert (tmp_path / CLASSIFIER_CONFIG_NAME).is_file() and (tmp_path / CLASSIFIER_SAFE_NAME).is_file()
    loaded = AdaInferLlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.exit_classifier, ExitClassifier)
    after = _outputs(loaded)
    assert torch.equal(after.exit_layers, before.exit_layers)
    assert torch.allclose(after.logits, before.logits, atol=1e-6)
    # None means "never exit" even when an artifact sits beside the weights
    plain = AdaInferLlamaForCausalLM.from_pretrained(tmp_path, exit_classifier=None)
    assert plain.exit_classifier is None and _outputs(plain).exit_layers.tolist() == [4, 4, 4]


def test_explicit_classifier_directory(tmp_path):
    stock, ada = make_pair("llama_gqa")
    stock.save_pretrained(tmp_path / "model")
    _classifier(ada, min_layer=3).save_pretrained(tmp_path / "clf")
    model = AdaInferLlamaForCausalLM.from_pretrained(tmp_path / "model", exit_classifier=tmp_path / "clf")
    assert _outputs(model).exit_layers.tolist() == [3, 3, 3]


def test_classifier_for_another_model_is_refused_unless_overridden(tmp_path):
    _, ada = make_pair("llama_gqa")
    other, _ = make_pair("llama_gqa", seed=7)  # same shape, different weights: fingerprint differs
    other.save_pretrained(tmp_path / "other")
    _classifier(ada).save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="fingerprint"):
        AdaInferLlamaForCausalLM.from_pretrained(tmp_path / "other", exit_classifier=tmp_path / "clf")
    with pytest.warns(UserWarning, match="fingerprint"):
        model = AdaInferLlamaForCausalLM.from_pretrained(
            tmp_path / "other", exit_classifier=tmp_path / "clf", ignore_classifier_mismatch=True)
    assert model.exit_classifier is not None
    with pytest.raises(TypeError, match="str"):
        model.exit_classifier = "not-a-classifier"


def test_push_to_hub_uploads_weights_and_classifier(tmp_path, local_hub):
    _, ada = make_pair("llama_gqa")
    ada.exit_classifier = _classifier(ada)
    ada.push_to_hub("org/tiny-early-exit", token="hf_test")
    files = set(local_hub.repos["org/tiny-early-exit"]["files"])
    assert {"config.json", "model.safetensors", CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME} <= files
    loaded = AdaInferLlamaForCausalLM.from_pretrained("org/tiny-early-exit", cache_dir=tmp_path / "cache",
                                                      token="hf_test")
    assert isinstance(loaded.exit_classifier, ExitClassifier)
    assert _outputs(loaded).exit_layers.tolist() == [2, 2, 2]


def _unbound():
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(50, 2))
    return ExitClassifier(LogisticRegression().fit(X, (X[:, 1] > 0.5).astype(int)), min_layer=2)


@pytest.mark.parametrize("how", ["attribute", "from_pretrained"])
def test_an_unbound_classifier_is_bound_to_the_model_it_meets(tmp_path, how):
    stock, ada = make_pair("llama_gqa")
    clf = _unbound()
    assert clf.num_layers is None and clf.lm_head_fingerprint is None
    if how == "attribute":
        ada.exit_classifier = clf
    else:
        stock.save_pretrained(tmp_path / "stock")
        ada = AdaInferLlamaForCausalLM.from_pretrained(tmp_path / "stock", exit_classifier=clf)
    ada.save_pretrained(tmp_path / "saved")
    saved = ExitClassifier.from_pretrained(tmp_path / "saved")
    assert saved.num_layers == 4 and saved.lm_head_fingerprint is not None
    # The saved artifact now refuses a model of another depth and another head.
    torch.manual_seed(5)
    deeper = AdaInferLlamaForCausalLM(stock.config.__class__(**{**stock.config.to_dict(),
                                                               "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match="num_layers: classifier 4 vs model 6"):
        deeper.exit_classifier = saved
    other, _ = make_pair("llama_gqa", seed=7)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="fingerprint"):
        AdaInferLlamaForCausalLM.from_pretrained(tmp_path / "other", exit_classifier=tmp_path / "saved")
