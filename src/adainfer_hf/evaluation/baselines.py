"""How each evaluated method is built: the oracle, the paper's gap rule, a live CRF, ShortGPT, the sweep.

[`prepare_baselines`] builds them once from calibration prompts disjoint from the evaluated ones;
`evaluate.evaluate_prompts` runs them. See `evaluate` for the list of methods and what each one runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..architectures.registry import spec_for
from ..data.prompts import split_examples
from ..estimators.rules import GapThresholdRule
from ..policy.base import ExitPolicy
from ..policy.classifier import ExitClassifier
from ..training.calibrate import calibrate
from ..training.collect import collect_features
from ..training.train import train_exit_classifier
from .shortgpt import shortgpt_model

__all__ = [
    "EVAL_METHODS", "METHOD_LABELS", "SWEEP_TARGETS", "Baselines", "LiveCRFPolicy", "gap_rule_classifier", "lens_top_tokens",
    "oracle_exit_layers", "prepare_baselines",
]

EVAL_METHODS = ("dense", "adainfer", "gap", "crf", "shortgpt", "oracle")  # also the order of tables and plots
METHOD_LABELS = {"dense": "Dense", "adainfer": "AdaInfer", "gap": "gap>0.8", "crf": "CRF", "shortgpt": "ShortGPT",
                 "oracle": "Oracle"}
SWEEP_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
CURVE_FEATURES = ("gap", "top_prob")


# ---------------------------------------------------------------------------------------------------- policies
def lens_top_tokens(table) -> np.ndarray:
    """The logit lens' top-1 token of every prompt at every layer, int `[P, L]` (column `L-1`: the dense output)."""
    L = int(table.num_layers.max())
    top = np.zeros((table.num_prompts, L), dtype=np.int64)
    top[table.prompt_id, table.layer - 1] = table.top_token
    top[:, L - 1] = table.final_token
    return top


def oracle_exit_layers(table) -> np.ndarray:
    """Earliest 1-based layer whose logit-lens top-1 equals the dense top-1 and stays equal through layer `L`.

    Args:
        table ([`~adainfer_hf.collect.FeatureTable`]): an all-layers pass (one row per prompt and layer `1..L-1`).

    Returns:
        `np.ndarray` int `[P]`; `L` where only the last layer has the answer.
    """
    agree = lens_top_tokens(table) == table.final_token[:, None]
    suffix = np.logical_and.accumulate(agree[:, ::-1], axis=1).sum(1)  # length of the all-agree tail
    return (agree.shape[1] - suffix + 1).astype(np.int64)


def gap_rule_classifier(threshold: float = 0.8):
    """The paper's fixed rule "exit once `gap > threshold`" as an [`~adainfer_hf.classifier.ExitClassifier`]."""
    return ExitClassifier(GapThresholdRule(feature_index=0, threshold=threshold).fit(np.zeros((1, 2))),
                          features=("gap", "top_prob"))


class LiveCRFPolicy(ExitPolicy):
    """A calibrated CRF [`ExitClassifier`] decided live, layer by layer, from each row's whole feature history.

    The decoder loop creates per-forward state with `begin_run` and hands it to `decide`; the policy appends each
    row's features to its history and fires where P(label 1 at layer k | layers 1..k) >= the calibrated threshold,
    from the calibrated `min_layer` on: exactly the causal score `calibrate` chose the threshold on. Features are
    computed at every layer (the history needs them), so the check costs a logit lens per layer.

    Args:
        classifier ([`ExitClassifier`]): wraps a fitted `train.CRFExitEstimator`, calibrated by `calibrate`.
    """

    def __init__(self, classifier):
        if not hasattr(classifier.estimator, "crf_"):
            raise ValueError(f"LiveCRFPolicy needs an ExitClassifier around a fitted CRFExitEstimator; got "
                             f"{type(classifier.estimator).__name__}.")
        self.classifier = classifier
        self.features = tuple(classifier.features)
        self.min_layer = 1
        # an uncalibrated CRF fires where its marginal says "1" is the likelier label
        self.threshold = 0.5 if classifier.threshold is None else float(classifier.threshold)
        self.check_layers = () if classifier.check_layers == () else None  # () = calibrated never to exit

    def begin_run(self, batch_size: int) -> dict:
        """Fresh per-forward state: row -> list of CRF feature dicts, one per layer seen."""
        return {}

    def decide(self, features, layer, rows, state=None):
        """Appends this layer's features to each row's history; True where the causal score reaches the threshold
        (see `ExitPolicy.decide`; `state` comes from `begin_run`)."""
        est, clf = self.classifier.estimator, self.classifier
        if state is None:
            raise ValueError("LiveCRFPolicy.decide needs the loop's per-forward state (begin_run).")
        X = features.detach().to("cpu", torch.float64).numpy()
        fire = np.zeros(len(rows), dtype=bool)
        allowed = layer >= clf.min_layer and (clf.check_layers is None or layer in clf.check_layers)
        for j, row in enumerate(rows.tolist()):
            p = est.extend_history(state.setdefault(row, []), X[j])
            fire[j] = allowed and p >= self.threshold
        return torch.from_numpy(fire).to(features.device)

    def validate_for(self, model, ignore_mismatch: bool = False) -> None:
        """Delegates to the wrapped classifier's check of the base model."""
        self.classifier.validate_for(model, ignore_mismatch=ignore_mismatch)


# ---------------------------------------------------------------------------------------------------- setup
@dataclass
class Baselines:
    """What [`prepare_baselines`] builds once and every evaluated shard reuses.

    Args:
        policies (`dict[str, ExitPolicy]`): live policies of `adainfer`, `gap` and `crf` (those requested).
        pruned (`PreTrainedModel`, *optional*): the ShortGPT model; `removed_layers`, `block_influence` describe it.
        sweep (`list[tuple[float, ExitClassifier]]`): the adainfer classifier re-calibrated at each target.
        info (`dict`): JSON-able description of every method (for results.json).
    """

    policies: dict = field(default_factory=dict)
    pruned: object | None = None
    removed_layers: list = field(default_factory=list)
    block_influence: list = field(default_factory=list)
    sweep: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def prepare_baselines(model, tokenizer, calibration_prompts, methods: Sequence[str] = EVAL_METHODS, exit_classifier=None,
                      crf_classifier=None, shortgpt_layers: int | None = None, target_agreement: float | None = None,
                      sweep_targets: Sequence[float] = SWEEP_TARGETS, seed: int = 0, batch_size: int = 8,
                      progress: bool = True) -> Baselines:
    """Builds the baselines from calibration prompts disjoint from the evaluated ones.

    One all-layers pass over `calibration_prompts` gives a calibration table. When `crf` is requested without
    `crf_classifier`, a CRF is trained on half of its examples and calibrated on the other half (to the adainfer
    classifier's recorded target, or `target_agreement`). The sweep re-calibrates `exit_classifier` on the whole
    table at each of `sweep_targets`. ShortGPT's Block Influence is measured on (up to 64 of) the calibration texts.

    Args:
        model, tokenizer: an AdaInfer model and its tokenizer.
        calibration_prompts (`Sequence[data.Prompt]`): held-out prompts (may be empty when nothing needs them).
        methods (`Sequence[str]`): subset of `EVAL_METHODS`.
        exit_classifier ([`ExitClassifier`], *optional*): the adainfer method's classifier (required for it).
        crf_classifier ([`ExitClassifier`], *optional*): a calibrated CRF; trained here when None.
        shortgpt_layers (`int`, *optional*): layers ShortGPT removes; default `round(L / 4)` (ShortGPT's ~25%).
        target_agreement (`float`, *optional*): CRF calibration target when the classifier records none (0.99).
        sweep_targets (`Sequence[float]`): calibration targets of the accuracy-vs-FLOPs sweep (empty: none).
        seed, batch_size, progress: split seed, prompts per forward, progress bars.
    """
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; expected names from {list(EVAL_METHODS)}.")
    L = spec_for(model).num_layers(model)
    notes = {"dense": "full depth", "oracle": "earliest layer agreeing with dense through L (the ceiling), run "
             "with ScriptedExit; its exact match is dense's by construction"}
    out = Baselines(info={m: notes[m] for m in ("dense", "oracle") if m in methods})
    calibration_prompts = list(calibration_prompts)
    if "adainfer" in methods:
        if exit_classifier is None:
            raise ValueError("method 'adainfer' needs exit_classifier; got None.")
        exit_classifier.validate_for(model)
        out.policies["adainfer"] = exit_classifier
        out.info["adainfer"] = {"features": list(exit_classifier.features), "threshold": exit_classifier.threshold,
                                "min_layer": exit_classifier.min_layer,
                                "calibration": (exit_classifier.calibration or {}).get("conclusion")}
    if "gap" in methods:
        out.policies["gap"] = gap_rule_classifier()
        out.info["gap"] = "exit once gap > 0.8 (the paper's rule), every layer checked"
    need_table = ("crf" in methods and crf_classifier is None) or (exit_classifier is not None and sweep_targets)
    table = None
    if need_table:
        if not calibration_prompts:
            raise ValueError("The CRF training / calibration sweep need calibration_prompts; got none.")
        feats = tuple(dict.fromkeys((*CURVE_FEATURES, *(exit_classifier.features if exit_classifier else ()))))
        table = collect_features(model, tokenizer, calibration_prompts, features=feats, batch_size=batch_size,
                                 progress=progress)
    cal = (exit_classifier.calibration or {}) if exit_classifier is not None else {}
    target = target_agreement if target_agreement is not None else cal.get("target_agreement", 0.99)
    if "crf" in methods:
        source = "given"
        if crf_classifier is None:
            crf_classifier, source = _train_crf(table, target, seed)
        out.policies["crf"] = LiveCRFPolicy(crf_classifier)
        out.info["crf"] = {"decision": "live (per-forward state, causal sequence score)", "source": source,
                           "target_agreement": (crf_classifier.calibration or {}).get("target_agreement", target),
                           "threshold": crf_classifier.threshold, "min_layer": crf_classifier.min_layer,
                           "never_exit": out.policies["crf"].check_layers == ()}
    if "shortgpt" in methods:
        n = max(1, round(L / 4)) if shortgpt_layers is None else int(shortgpt_layers)
        texts = [p.text for p in calibration_prompts[:64]]
        if not texts:
            raise ValueError("method 'shortgpt' needs calibration_prompts to measure Block Influence; got none.")
        out.pruned, out.removed_layers, bi = shortgpt_model(model, tokenizer, texts, n, batch_size=batch_size)
        out.block_influence = [float(v) for v in bi]
        out.info["shortgpt"] = {"removed_layers": out.removed_layers, "block_influence": out.block_influence,
                                "calibration_texts": len(texts)}
    if exit_classifier is not None and table is not None:
        for t in sweep_targets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out.sweep.append((float(t), calibrate(exit_classifier, table, target_agreement=float(t))))
    return out


def _train_crf(table, target: float, seed: int):
    """A CRF trained on half of the calibration table's examples and calibrated on the other half."""
    keys = list(zip(table.task.tolist(), table.example_index.tolist(), strict=True))
    train_keys = set(split_examples(sorted(set(keys)), [0.5], seed=seed)[0])
    is_train = np.array([k in train_keys for k in keys])
    crf = train_exit_classifier(table.select_prompts(np.flatnonzero(is_train)), method="crf",
                                features=CURVE_FEATURES, seed=seed)
    with warnings.catch_warnings():  # calibrate warns that row-wise decide differs: LiveCRFPolicy does not
        warnings.simplefilter("ignore", UserWarning)
        crf = calibrate(crf, table.select_prompts(np.flatnonzero(~is_train)), target_agreement=target)
    return crf, f"trained here on {int(is_train.sum())} held-out prompts, calibrated on {int((~is_train).sum())}"
