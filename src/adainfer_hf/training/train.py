"""Training exit classifiers on a [`~adainfer_hf.collect.FeatureTable`].

Every method returns an [`~adainfer_hf.classifier.ExitClassifier`] (not yet bound to a model, not yet
calibrated):

| method | estimator | on-device decision |
|---|---|---|
| `"svm"` (the paper's) | `Pipeline(StandardScaler, SVC(kernel="rbf"))` | no (scikit-learn on the CPU) |
| `"linear_svm"` | `LinearSVC` with the scaler folded into `coef_`/`intercept_` | yes (one matmul) |
| `"logistic"` | `LogisticRegression`, scaler folded the same way | yes |
| `"crf"` | `estimators.crf.CRFExitEstimator` over each prompt's layer sequence (`pip install adainfer-hf[crf]`) | no |
| `"gap_rule"` | `estimators.rules.GapThresholdRule(threshold=0.8)`, nothing learned | yes |
| `"gate_only"` | the linear gate alone: `estimators.rules.AlwaysExit` fires wherever its check runs, so a check exits exactly where the gate passes; `train_on_tables` adds the gate and calibrates its thresholds (`gate="linear"`, `knob="gate"`) | yes |

`"gate_only"` is the cheapest rule in decode steps: a check that the gate stops costs only the probe, and every
check it passes is an exit, so the LM head never runs in vain.
"""

from __future__ import annotations

import numpy as np

from ..data.prompts import split_examples
from ..policy.classifier import ExitClassifier
from ..policy.gate import fit_linear_gate
from ..utils.distributed import is_distributed, on_main
from .calibrate import calibrate
from .collect import collect_features
from .collect_generation import collect_generation_features
from .config import GATES, TRAIN_METHODS, GenerationCalibrationConfig, TrainingConfig
from .cost_model import CostModel
from .drafting import draft_for_config
from .fit import train_exit_classifier
from .free_running import FreeRunning, calibrate_free_running, candidate_ladder
from .schedule import resolve_check_costs, resolve_gate_costs, schedule_classifier
from .table import FeatureTable
from .vocabulary import restrict_tables

__all__ = [
    "GATES",
    "TRAIN_METHODS",
    "resolve_gate_and_knob",
    "train_and_calibrate",
    "train_exit_classifier",
    "train_on_tables",
]

def resolve_gate_and_knob(method: str, gate: str | None, knob: str | None) -> tuple[str | None, str]:
    """The gate and the calibration knob a training method runs with: `"gate_only"` is the linear gate calibrated
    as the knob (a `gate` of None means "linear" there, and any knob but "gate" is refused); other methods keep
    `gate` and default the knob to the classifier's threshold."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is not supported; expected one of {list(GATES)}.")
    if method != "gate_only":
        return gate, "classifier" if knob is None else knob
    if knob not in (None, "gate"):
        raise ValueError(f"method='gate_only' exits wherever its gate passes, so calibration tunes the gate: knob "
                         f"must be 'gate' (or None); got knob={knob!r}.")
    return gate or "linear", "gate"


def train_and_calibrate(model, tokenizer, prompts, config: TrainingConfig | None = None, *, progress: bool = True,
                        distributed: bool | None = None, cost_model: CostModel | None = None):
    """The whole recipe: collect features, split prompts, train, calibrate on the held-out part, choose the check
    schedule, bind to `model`.

    Prompts are split by example (task and example index): calibration prompts are disjoint from training ones.

    Args:
        model, tokenizer: an AdaInfer model (see `models.loading.load_adainfer_model`) and its tokenizer.
        prompts (`Sequence[data.Prompt]`): all prompts; `config.calibration.calibration_fraction` of their
            examples calibrate.
        config ([`TrainingConfig`], *optional*): how to train, calibrate and schedule (defaults: the paper's SVM
            on `gap` and `top_prob`, target 0.99, measured check costs). With
            `config.generation.generation_tokens` the tables hold the first tokens the dense model generates per
            prompt (`collect_generation_features`, for `generate`); with `free_running_tokens` the chosen rule is
            certified on free-running generations of the calibration prompts (`free_running.calibrate_free_running`,
            candidates from the training table). A gate or a check vocabulary records the hidden states.
            With `config.drafting` ([`DraftingConfig`]) the classifier is trained for lossless `generate`
            instead: the rule (check layers, threshold, shortlist, draft cap) with the best speed predicted by
            `training.drafting` under `cost_model`, `drafting=True`; `config.drafting.holdout_fraction` of the
            examples are held out to predict it (the second table returned).
        progress (`bool`, *optional*, defaults to True): progress bars while collecting (on the main process).
        distributed (`bool`, *optional*): share the work over the processes of an initialized `torch.distributed`
            group (`accelerate launch`; every process calls this with the same arguments): each collects its share
            of the prompt batches (and generates its share of the free-running generations), the main process
            merges the tables (those of one process, row for row), trains, measures the check costs and
            calibrates. None (the default): whenever such a group with more than one process exists.
        cost_model ([`CostModel`], *optional*): with `config.drafting`, the step costs to predict with; None
            measures them on `model` now (`cost_model.measure_cost_model`).

    Returns:
        `(classifier, train_table, calibration_table)`: the calibrated, bound [`ExitClassifier`] (its
        `calibration["training_config"]` is `config.to_dict()`) and both tables. Sharded, every process gets the
        classifier (the main process's) and only the main process the tables (None elsewhere): write the
        artifact from the main process (`utils.distributed.is_main_process()`).
    """
    config = _config_or_default(config)
    prompts = list(prompts)
    distributed = is_distributed() if distributed is None else bool(distributed) and is_distributed()
    if config.drafting is not None:
        return _train_drafting(model, tokenizer, prompts, config, progress, cost_model, distributed)
    gate, _ = resolve_gate_and_knob(config.method, config.gate.kind, config.calibration.knob)
    is_train = _split_by_example(prompts, config.calibration.calibration_fraction, config.seed)
    record = dict(features=config.features, batch_size=config.batch_size, progress=progress,
                  check_dtype=config.schedule.check_dtype, hidden_states=config.hidden_states or gate is not None
                  or config.schedule.check_vocabulary is not None, distributed=distributed)
    generation = config.generation
    train_table, calib_table = _collect_split(model, tokenizer, prompts, is_train, generation, record)
    check_length = config.schedule.check_length or int(np.median([len(tokenizer(p.text).input_ids)
                                                                  for p in prompts]))
    free = None if generation.free_running_tokens is None else FreeRunning(
        tokenizer, [prompts[i] for i in np.flatnonzero(~is_train)], generation.free_running_tokens,
        generation.exit_cache, config.batch_size, distributed=distributed)
    if distributed:
        clf = _train_on_tables_sharded(model, train_table, calib_table, config, check_length, free)
    else:
        clf = _train_on_tables(model, train_table, calib_table, config, check_length, free)
    return _recorded(clf, config, model), train_table, calib_table


def _train_on_tables_sharded(model, train_table, calib_table, config, check_length, free) -> ExitClassifier:
    """[`_train_on_tables`] over the processes: the main process (which alone has the tables) trains, measures the
    costs and calibrates; with free-running calibration its candidate ladder goes to every process, and each
    generates its share of the calibration generations. Every process returns the same classifier."""
    if free is None:
        return on_main(lambda: _train_on_tables(model, train_table, calib_table, config, check_length, None))
    ladder = on_main(lambda: _train_on_tables(model, train_table, None, config, check_length, free, ladder_only=True))
    return _free_running_choice(model, ladder, config, free)


def _train_drafting(model, tokenizer, prompts, config: TrainingConfig, progress: bool, cost_model,
                    distributed: bool):
    """[`train_and_calibrate`] with `config.drafting`: collect on generated tokens, search the rule, record.
    Sharded, every process collects its share of the batches; the main process (which alone has the tables)
    measures the cost model on its device, searches and trains, and every process gets its classifier."""
    drafting = config.drafting
    is_train = _split_by_example(prompts, drafting.holdout_fraction, config.seed)
    shortlists = any(size is not None for size in drafting.vocabulary_sizes)
    record = dict(features=config.features, batch_size=config.batch_size, progress=progress,
                  check_dtype=config.schedule.check_dtype, hidden_states=config.hidden_states or shortlists,
                  distributed=distributed)
    train_table, holdout_table = _collect_split(model, tokenizer, prompts, is_train, config.generation, record)
    fit = lambda table: train_exit_classifier(table, method=config.method, features=config.features,  # noqa: E731
                                              label=config.label, max_rows=config.max_rows, seed=config.seed)
    search = lambda: draft_for_config(model, train_table, holdout_table, drafting, fit, cost_model)  # noqa: E731
    clf = on_main(search) if distributed else search()
    return _recorded(clf, config, model), train_table, holdout_table


def _collect_split(model, tokenizer, prompts, is_train, generation: GenerationCalibrationConfig, record):
    """(train, calibration) tables of the prompts' next token, or of their first `generation_tokens` tokens."""
    if generation.generation_tokens is None:
        table = collect_features(model, tokenizer, prompts, **record)
        unit_is_train = is_train
    else:
        table = collect_generation_features(model, tokenizer, prompts, new_tokens=generation.generation_tokens,
                                            first_layer=generation.first_layer, **record)
        unit_is_train = None if table is None else is_train[table.sequence]
    if table is None:  # another process's share: the main process holds the tables
        return None, None
    return table.select_prompts(np.flatnonzero(unit_is_train)), table.select_prompts(np.flatnonzero(~unit_is_train))


def _split_by_example(prompts, calibration_fraction: float, seed: int) -> np.ndarray:
    """Bool per prompt: True on the training side; one example (task, index) lands on one side only."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1); got {calibration_fraction!r}.")
    keys = sorted({(p.task, p.index) for p in prompts})
    if len(keys) < 2:
        raise ValueError(
            f"Need prompts for at least 2 distinct examples to split train/calibration; got {len(keys)}."
        )
    train_keys = set(split_examples(keys, [1.0 - calibration_fraction], seed=seed)[0])
    is_train = np.array([(p.task, p.index) in train_keys for p in prompts])
    if is_train.all() or not is_train.any():
        raise ValueError(
            f"calibration_fraction={calibration_fraction} leaves one side of the split empty "
            f"({len(keys)} examples)."
        )
    return is_train


def train_on_tables(model, train_table: FeatureTable, calib_table: FeatureTable | None,
                    config: TrainingConfig | None = None, *, free_running: FreeRunning | None = None):
    """Train on `train_table`, calibrate on `calib_table`, choose the check schedules, bind to `model`.

    The tables' `check_dtype` (see `collect.collect_features`) carries into the classifier and the measured check
    cost. Tables from `collect_generation_features` (one unit per generated token) are calibrated with their
    sequences as the draws, and their first tokens and decode steps choose the prompt and decode schedules.

    Args:
        model: the AdaInfer model the tables were collected on.
        train_table, calib_table ([`FeatureTable`]): training and calibration units, disjoint.
        config ([`TrainingConfig`], *optional*): as in [`train_and_calibrate`]; the collection settings
            (`batch_size`, `hidden_states`, `generation.generation_tokens`, `generation.first_layer`) are the
            tables' and not read here, and `schedule.check_length` defaults to 256.
            - `gate.kind="linear"` puts a `policy.gate.LinearGate` in front of every check, fitted on `train_table`'s
              hidden states to pass `gate.recall` of the rows whose lens agrees (`label`); the classifier is trained
              as without it, and calibration and the schedule measure the composed rule.
            - `calibration.knob`: the classifier's threshold (`"classifier"`, the default) or, with a gate, the
              gate's thresholds (`"gate"`); `method="gate_only"` always tunes the gate (and brings the linear gate).
            - `schedule.check_vocabulary`: checks over a shortlist of token ids (see
              `ExitClassifierConfig.check_vocabulary`), the ids or how many to take (the dense model's tokens on
              `train_table`, most frequent first, then the lowest ids: `vocabulary.choose_check_vocabulary`). Both
              tables are restricted to it first (`vocabulary.restrict_table`, which needs their hidden states), so
              training, calibration and the measured check cost are those of the shortlisted checks.
            - `schedule.check_dtype`, if set, must be the tables' check dtype.
        free_running ([`free_running.FreeRunning`], *optional*): certify free-running generations instead: a ladder
            of candidates calibrated and scheduled on `train_table` is tested by generating on its prompts
            (`free_running.calibrate_free_running`); `calib_table` is then not used (it may be None). Needed when
            `config.generation.free_running_tokens` is set (and then of that length and `exit_cache`).

    Returns:
        The calibrated, scheduled, bound [`ExitClassifier`]; `calibration["training_config"]` is
        `config.to_dict()`.
    """
    config = _config_or_default(config)
    if config.drafting is not None:
        raise ValueError("config.drafting trains for lossless generate, which collects its own generation tables "
                         "and cost model; call train_and_calibrate (CLI: adainfer train --lossless without "
                         "--from-tables).")
    _check_tables_match(config, train_table, free_running)
    clf = _train_on_tables(model, train_table, calib_table, config, config.schedule.check_length or 256, free_running)
    return _recorded(clf, config, model)


def _config_or_default(config) -> TrainingConfig:
    if config is None:
        return TrainingConfig()
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig (or None for the defaults); got {type(config).__name__}. "
                        "Build one from a dict with TrainingConfig.from_dict.")
    return config


def _check_tables_match(config: TrainingConfig, train_table: FeatureTable, free_running) -> None:
    """What `train_on_tables` cannot change about its tables and free-running setting must agree with `config`."""
    table_dtype = train_table.meta.get("check_dtype")
    if config.schedule.check_dtype is not None and config.schedule.check_dtype != table_dtype:
        raise ValueError(f"check_dtype={config.schedule.check_dtype!r} differs from the tables' check dtype "
                         f"{table_dtype!r}; collect the tables again with check_dtype={config.schedule.check_dtype!r}.")
    tokens, cache = config.generation.free_running_tokens, config.generation.exit_cache
    if tokens is not None and free_running is None:
        raise ValueError(f"free_running_tokens={tokens} generates on calibration prompts, which train_on_tables does "
                         f"not have; pass free_running=FreeRunning(tokenizer, prompts, {tokens}).")
    if tokens is not None and (free_running.new_tokens, free_running.exit_cache) != (tokens, cache):
        raise ValueError(f"free_running generates {free_running.new_tokens} tokens with exit_cache="
                         f"{free_running.exit_cache!r}, but the config says free_running_tokens={tokens}, "
                         f"exit_cache={cache!r}.")


def _recorded(clf: ExitClassifier, config: TrainingConfig, model) -> ExitClassifier:
    """`clf` with the config it was made with in its calibration record (saved with the artifact)."""
    calibration = dict(clf.calibration) if isinstance(clf.calibration, dict) else {}
    return clf.replace(calibration={**calibration, "training_config": config.to_dict()}).bind(model)


def _train_on_tables(model, train_table, calib_table, config: TrainingConfig, check_length: int,
                     free_running, ladder_only: bool = False) -> ExitClassifier | list[ExitClassifier]:
    """[`train_on_tables`] with the check length resolved (`ladder_only`: the free-running candidates only)."""
    gate, knob = resolve_gate_and_knob(config.method, config.gate.kind, config.calibration.knob)
    train_table, calib_table = restrict_tables(model, train_table, calib_table, config.schedule.check_vocabulary)
    tables = [train_table] if free_running is not None else [train_table, calib_table]
    if gate is not None and any(t.hidden is None for t in tables):
        raise ValueError("gate='linear' trains and calibrates on hidden states, but the tables have none; collect "
                         "them with hidden_states=True (CLI: --tables-out, or train with --gate linear).")
    clf = _fit(train_table, config.method, config.features, config.label, config.max_rows, config.seed, gate,
               config.gate.recall)
    schedule = config.schedule
    costs = _costs(model, clf, schedule.check_cost, check_length, schedule.check_phase, config.gate.cost)
    target, delta = config.calibration.target_agreement, config.calibration.delta
    cal = dict(target_agreement=target, delta=delta, min_layers=config.calibration.min_layers, knob=knob)
    if free_running is not None:
        ladder = candidate_ladder(clf, train_table, levels=free_running.levels, **cal,
                                  finish=lambda c: _scheduled(model, c, train_table, costs))
        return ladder if ladder_only else _free_running_choice(model, ladder, config, free_running)
    return _scheduled(model, calibrate(clf, calib_table, **cal), calib_table, costs)


def _free_running_choice(model, ladder, config: TrainingConfig, free_running) -> ExitClassifier:
    """The candidate of `ladder` that free-running calibration chooses (sharded as `free_running` says)."""
    return calibrate_free_running(model, free_running.tokenizer, free_running.prompts, ladder,
                                  target_agreement=config.calibration.target_agreement,
                                  delta=config.calibration.delta, new_tokens=free_running.new_tokens,
                                  exit_cache=free_running.exit_cache, batch_size=free_running.batch_size,
                                  reference=free_running.reference(model), distributed=free_running.distributed)


def _fit(train_table, method, features, label, max_rows, seed, gate, gate_recall) -> ExitClassifier:
    """The trained, uncalibrated classifier, with its gate fitted on the same table."""
    clf = train_exit_classifier(train_table, method=method, features=features, label=label, max_rows=max_rows,
                                seed=seed)
    if gate is None:
        return clf
    return clf.replace(gate=fit_linear_gate(train_table.hidden, train_table.layer, train_table.labels(label),
                                            recall=gate_recall, seed=seed))


def _costs(model, clf, check_cost, check_length, check_phase, gate_cost):
    """(check, decode check, gate, decode gate) costs in layers for the schedule; None first = check every layer."""
    cost, decode_cost = resolve_check_costs(model, check_cost, seq_len=check_length, phase=check_phase,
                                            check_dtype=clf.check_dtype, check_vocabulary=clf.check_vocabulary)
    if cost is None:
        return None, None, None, None
    return (cost, decode_cost, *resolve_gate_costs(model, clf.gate, gate_cost, seq_len=check_length,
                                                   phase=check_phase))


def _scheduled(model, clf, table, costs) -> ExitClassifier:
    if costs[0] is not None:
        schedule_classifier(clf, table, costs[0], decode_check_cost=costs[1], gate_cost=costs[2],
                            decode_gate_cost=costs[3])
    return clf.bind(model)
