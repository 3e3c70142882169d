"""`TrainingConfig`: validation, an exact dict/JSON round trip, the flags that build it, and the record every trained
classifier keeps of it (saved in exit_classifier_config.json)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from tiny_models import task_tokenizer, tiny_pair, tiny_prompts

from adainfer_hf import (
    CalibrationConfig,
    DraftingConfig,
    ExitClassifier,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from adainfer_hf.artifact.constants import CLASSIFIER_CONFIG_NAME
from adainfer_hf.cli.main import build_parser
from adainfer_hf.cli.train import training_config_from_args
from adainfer_hf.training import FreeRunning, calibrate, collect_features, train_exit_classifier
from adainfer_hf.training.train import train_and_calibrate, train_on_tables


def _every_field_set() -> TrainingConfig:
    """A config with no field at its default (so that a field the round trip drops shows)."""
    return TrainingConfig(
        method="logistic", features=("gap", "top_prob", "kl_prev"), label="gold", max_rows=123, seed=7, batch_size=3,
        hidden_states=True,
        calibration=CalibrationConfig(target_agreement=0.875, delta=0.2, calibration_fraction=0.4, knob="gate",
                                      min_layers=(1, 3)),
        gate=GateConfig(kind="linear", recall=0.95, cost=0.125),
        schedule=ScheduleConfig(check_cost=1.5, check_phase="decode", check_length=17, check_dtype="bfloat16",
                                check_vocabulary=(9, 2, 5)),
        generation=GenerationCalibrationConfig(generation_tokens=4, first_layer=2, free_running_tokens=6,
                                               exit_cache="exact"),
    )


def test_to_dict_round_trips_exactly_through_json():
    config = _every_field_set()
    defaults = TrainingConfig()
    for f in dataclasses.fields(TrainingConfig):  # every field differs from its default, nested ones included
        if f.name == "drafting":  # (None by default, and refused with a gate: round-tripped with every field below)
            continue
        if f.name in TrainingConfig._NESTED:
            sub, default_sub = getattr(config, f.name), getattr(defaults, f.name)
            assert all(getattr(sub, g.name) != getattr(default_sub, g.name) for g in dataclasses.fields(sub)), f.name
        else:
            assert getattr(config, f.name) != getattr(defaults, f.name), f.name
    data = config.to_dict()
    text = json.dumps(data, sort_keys=True)
    assert json.loads(text) == data  # plain JSON types only
    assert TrainingConfig.from_dict(json.loads(text)) == config
    assert data["schedule"]["check_vocabulary"] == [2, 5, 9]  # normalised as a classifier keeps it: sorted ids
    assert data["calibration"]["min_layers"] == [1, 3] and data["features"] == ["gap", "top_prob", "kl_prev"]
    assert TrainingConfig.from_dict(TrainingConfig().to_dict()) == TrainingConfig()
    drafting = DraftingConfig(max_draft_tokens=(2, 5), vocabulary_sizes=(None, 64), check_layers=(2, 3), max_layers=5,
                              thresholds=3, two_checks=1, margin=0.05, holdout_fraction=0.4, cost_cache_length=32,
                              cost_repeats=4)
    assert all(getattr(drafting, g.name) != getattr(DraftingConfig(), g.name) for g in dataclasses.fields(drafting))
    config = TrainingConfig(generation=GenerationCalibrationConfig(generation_tokens=4), drafting=drafting)
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainingConfig.from_dict({}) == TrainingConfig()  # a missing key is its default
    # lists and tuples give the same config; a count of ids stays a count
    assert TrainingConfig(features=["gap"]) == TrainingConfig(features=("gap",))
    assert ScheduleConfig(check_vocabulary=12).to_dict()["check_vocabulary"] == 12


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match=r"TrainingConfig has no field\(s\) \['target_agreement'\]"):
        TrainingConfig.from_dict({"method": "svm", "target_agreement": 0.9})
    with pytest.raises(ValueError, match=r"CalibrationConfig has no field\(s\) \['target_agreemnt'\]"):
        TrainingConfig.from_dict({"calibration": {"target_agreemnt": 0.9}})
    with pytest.raises(ValueError, match="GateConfig.from_dict expects a dict; got str"):
        TrainingConfig.from_dict({"gate": "linear"})


@pytest.mark.parametrize(("build", "message"), [
    (lambda: TrainingConfig(method="forest"), "method='forest' is not supported; expected one of"),
    (lambda: TrainingConfig(features=("gap", "entropy")), "features must be a non-empty sequence of names"),
    (lambda: TrainingConfig(features=()), "features must be a non-empty sequence"),
    (lambda: TrainingConfig(method="gate_only", features=("top_prob",)),
     r"method='gate_only' reads the 'gap' feature; features=\['top_prob'\] lack it"),
    (lambda: TrainingConfig(label="silver"), "label='silver' is not supported"),
    (lambda: TrainingConfig(max_rows=1), "max_rows must be an int >= 2; got 1"),
    (lambda: TrainingConfig(batch_size=0), "batch_size must be an int >= 1; got 0"),
    (lambda: TrainingConfig(seed=True), "seed must be an int >= 0; got True"),
    (lambda: TrainingConfig(hidden_states="yes"), "hidden_states must be a bool; got 'yes'"),
    (lambda: TrainingConfig(calibration={"delta": 0.2}), "calibration must be a CalibrationConfig; got dict"),
    (lambda: TrainingConfig(calibration=CalibrationConfig(knob="gate")),
     "knob='gate' calibrates the gate's thresholds, but the classifier has no gate"),
    (lambda: CalibrationConfig(target_agreement=1.0), r"target_agreement must lie in \(0, 1\); got 1.0"),
    (lambda: CalibrationConfig(delta=0), r"delta must lie in \(0, 1\); got 0"),
    (lambda: CalibrationConfig(calibration_fraction=1.5), "calibration_fraction must lie in"),
    (lambda: CalibrationConfig(knob="threshold"), "knob='threshold' is not supported"),
    (lambda: CalibrationConfig(min_layers=(0, 2)), r"min_layers must be a non-empty sequence of ints >= 1"),
    (lambda: CalibrationConfig(min_layers=()), "min_layers must be a non-empty sequence"),
    (lambda: GateConfig(kind="mlp"), "gate kind='mlp' is not supported; expected one of"),
    (lambda: GateConfig(recall=0), r"gate recall must lie in \(0, 1\]; got 0"),
    (lambda: GateConfig(cost=-1), "gate cost must be a number of layers >= 0 or 'auto'; got -1"),
    (lambda: GateConfig(cost="none"), "gate cost must be a number of layers >= 0 or 'auto'; got 'none'"),
    (lambda: ScheduleConfig(check_cost="cheap"), "check_cost must be a number of layers >= 0 or 'auto'"),
    (lambda: ScheduleConfig(check_cost=float("nan")), "check_cost must be a number of layers >= 0"),
    (lambda: ScheduleConfig(check_phase="generate"), "check_phase='generate' is not supported"),
    (lambda: ScheduleConfig(check_length=0), "check_length must be an int >= 1 or None; got 0"),
    (lambda: ScheduleConfig(check_dtype="float8"), "check_dtype='float8' is not supported"),
    (lambda: ScheduleConfig(check_vocabulary=1), "check_vocabulary must be an int >= 2"),
    (lambda: ScheduleConfig(check_vocabulary=(3, 3)), "check_vocabulary repeats token ids"),
    (lambda: GenerationCalibrationConfig(generation_tokens=0), "generation_tokens must be an int >= 1 or None"),
    (lambda: GenerationCalibrationConfig(first_layer=2), "first_layer=2 selects the layers generation_tokens"),
    (lambda: GenerationCalibrationConfig(free_running_tokens=-4), "free_running_tokens must be an int >= 1"),
    (lambda: GenerationCalibrationConfig(exit_cache="lazy"), "exit_cache='lazy' is not supported"),
])
def test_a_bad_setting_is_refused_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_gate_only_needs_no_gate_kind_for_the_gate_knob_and_configs_are_frozen():
    config = TrainingConfig(method="gate_only", calibration=CalibrationConfig(knob="gate"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "svm"
    assert dataclasses.replace(config, seed=3).seed == 3
    with pytest.raises(ValueError, match="max_rows must be an int >= 2"):
        dataclasses.replace(config, max_rows=0)  # a derived config is validated too


def test_the_train_flags_build_the_config_once():
    argv = ["train", "--model", "m", "--builtin-task", "capitalize", "--out", "o", "--method", "logistic",
            "--features", "gap", "kl_prev", "--label", "gold", "--max-rows", "50", "--seed", "4", "--batch-size", "2",
            "--target-agreement", "0.9", "--delta", "0.25", "--calibration-fraction", "0.3", "--min-layers", "2", "1",
            "--gate", "linear", "--gate-recall", "0.8", "--gate-cost", "0.02", "--knob", "gate",
            "--check-cost", "none", "--check-phase", "prefill", "--check-length", "40", "--check-dtype", "float16",
            "--check-vocabulary", "16", "--generation-tokens", "3", "--first-layer", "2", "--free-running", "5",
            "--exit-cache", "exact", "--tables-out", "t"]
    expected = TrainingConfig(
        method="logistic", features=("gap", "kl_prev"), label="gold", max_rows=50, seed=4, batch_size=2,
        hidden_states=True,
        calibration=CalibrationConfig(target_agreement=0.9, delta=0.25, calibration_fraction=0.3, knob="gate",
                                      min_layers=(2, 1)),
        gate=GateConfig(kind="linear", recall=0.8, cost=0.02),
        schedule=ScheduleConfig(check_cost=None, check_phase="prefill", check_length=40, check_dtype="float16",
                                check_vocabulary=16),
        generation=GenerationCalibrationConfig(generation_tokens=3, first_layer=2, free_running_tokens=5,
                                               exit_cache="exact"))
    assert training_config_from_args(build_parser().parse_args(argv)) == expected
    defaults = build_parser().parse_args(["train", "--model", "m", "--builtin-task", "capitalize", "--out", "o"])
    assert training_config_from_args(defaults) == TrainingConfig()  # the flags' defaults are the config's


def _tables(model, tok):
    table = collect_features(model, tok, tiny_prompts(4), features=("gap", "top_prob"), progress=False,
                             hidden_states=True)
    half = table.num_prompts // 2
    return table.select_prompts(range(half)), table.select_prompts(range(half, table.num_prompts))


def test_train_on_tables_runs_the_pieces_its_config_names():
    """The config's settings reach training and Learn-then-Test: the same as calling them by hand."""
    _, model = tiny_pair()
    train, calib = _tables(model, task_tokenizer())
    config = TrainingConfig(method="logistic", seed=3, calibration=CalibrationConfig(
        target_agreement=0.6, delta=0.3, min_layers=(1, 2)), schedule=ScheduleConfig(check_cost=None))
    clf = train_on_tables(model, train, calib, config)
    by_hand = calibrate(train_exit_classifier(train, method="logistic", seed=3), calib, target_agreement=0.6,
                        delta=0.3, min_layers=[1, 2])
    assert (clf.min_layer, clf.threshold, clf.check_layers) == (by_hand.min_layer, by_hand.threshold,
                                                                by_hand.check_layers)
    assert clf.calibration["min_layer_grid"] == [1, 2] and clf.calibration["target_agreement"] == 0.6
    np.testing.assert_array_equal(clf.estimator.coef_, by_hand.estimator.coef_)
    assert clf.num_layers == model.config.num_hidden_layers  # bound
    with pytest.raises(TypeError, match="config must be a TrainingConfig"):
        train_on_tables(model, train, calib, {"method": "logistic"})
    with pytest.raises(ValueError, match="check_dtype='float16' differs from the tables' check dtype None"):
        train_on_tables(model, train, calib, TrainingConfig(schedule=ScheduleConfig(check_dtype="float16")))
    free = TrainingConfig(generation=GenerationCalibrationConfig(free_running_tokens=3))
    with pytest.raises(ValueError, match="free_running_tokens=3 generates on calibration prompts"):
        train_on_tables(model, train, calib, free)
    setting = FreeRunning(task_tokenizer(), tiny_prompts(1), new_tokens=4)
    with pytest.raises(ValueError, match="free_running generates 4 tokens with exit_cache='propagate', but the "
                                         "config says free_running_tokens=3"):
        train_on_tables(model, train, None, free, free_running=setting)


def test_a_saved_classifier_reports_the_config_it_was_trained_with(tmp_path):
    _, model = tiny_pair()
    tok = task_tokenizer()
    config = TrainingConfig(method="logistic", seed=1, batch_size=3, gate=GateConfig(kind="linear", recall=0.9,
                                                                                     cost=0.01),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5, min_layers=(1, 2)),
                            schedule=ScheduleConfig(check_cost=2.0, check_phase="prefill", check_length=9),
                            generation=GenerationCalibrationConfig(generation_tokens=2))
    clf, train, _ = train_and_calibrate(model, tok, tiny_prompts(3, (0, 2)), config, progress=False)
    assert train.is_generation and clf.gate is not None  # the settings were used, not only recorded
    assert clf.calibration["schedule"]["check_cost_layers"] == 2.0
    clf.save_pretrained(tmp_path / "clf")
    on_disk = json.loads((tmp_path / "clf" / CLASSIFIER_CONFIG_NAME).read_text())
    assert on_disk["calibration"]["training_config"] == config.to_dict()
    loaded = ExitClassifier.from_pretrained(tmp_path / "clf")
    assert TrainingConfig.from_dict(loaded.calibration["training_config"]) == config
    # from tables too, and a default config is recorded as such
    train_t, calib_t = _tables(model, tok)
    plain = train_on_tables(model, train_t, calib_t, TrainingConfig(schedule=ScheduleConfig(check_cost=None)))
    plain.save_pretrained(tmp_path / "plain")
    back = ExitClassifier.from_pretrained(tmp_path / "plain").calibration["training_config"]
    assert TrainingConfig.from_dict(back) == TrainingConfig(schedule=ScheduleConfig(check_cost=None))
