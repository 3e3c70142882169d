"""The paper's generalization studies: does a classifier trained on some prompts stop well on others?

| mode | trained on | tested on |
|---|---|---|
| `"intra"` | a share of each task's examples | the other examples of the same task (one split per task) |
| `"inter"` | the first half of the tasks (or `train_tasks`) | the remaining tasks |
| `"loto"` | every task but one | the left-out task (one split per task) |

With `other_model`, every classifier trained on `model` is also applied to `other_model` (inter-model). The
features (`gap`, `top_prob`, ...) do not name a layer, so an estimator transfers as is; only the layer schedule
(`min_layer`, `check_layers`) is mapped by relative depth, `k -> round(k * L_B / L_A)` (identity when the layer
counts match) -- see [`transfer_classifier`].

The studies reuse the package's pipeline: one `collect.collect_features` pass per model over every prompt, then per
split `train.train_exit_classifier` on part of the training examples and `calibrate.calibrate` on the rest. Test
decisions are replayed on the test rows with `calibrate.simulate_exits`: the rows hold exactly the features the
decoder loop computes, so for row-wise estimators this is what a live run decides (CRFs use their causal score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.prompts import build_prompts, split_examples
from ..training.calibrate import calibrate, simulate_exits
from ..training.collect import collect_features
from ..training.train import train_exit_classifier
from .baselines import lens_top_tokens
from .evaluate import flops_ratio

__all__ = ["STUDY_MODES", "generalization_study", "transfer_classifier"]

STUDY_MODES = ("intra", "inter", "loto")


def transfer_classifier(clf, num_layers: int):
    """`clf` for a model with `num_layers` decoder layers: same estimator, layer schedule mapped by relative depth.

    Args:
        clf ([`ExitClassifier`]): a calibrated classifier (its `num_layers` must be known).
        num_layers (`int`): the target model's layer count.

    Returns:
        [`ExitClassifier`]: unbound (no LM-head fingerprint), with `num_layers` set to the target's.
    """
    if clf.num_layers is None:
        raise ValueError("transfer_classifier needs the source classifier's num_layers; got None (call bind).")
    src = int(clf.num_layers)

    def scale(k):
        return int(min(num_layers - 1, max(1, round(k * num_layers / src))))

    def scale_all(layers):
        return None if layers is None else [int(k) for k in sorted({scale(k) for k in layers})]

    # Every other field (threshold, check dtype, label, calibration, ...) carries over through the config; what
    # identified the source model does not.
    return clf.replace(num_layers=num_layers, min_layer=scale(clf.min_layer),
                       check_layers=scale_all(clf.check_layers),
                       decode_check_layers=scale_all(clf.decode_check_layers),
                       lm_head_fingerprint=None, base_model_name_or_path=None, base_model_revision=None)


def _splits(tasks: list[str], keys: list[tuple[str, int]], mode: str, train_tasks, train_fraction, seed):
    """(name, train example keys, test example keys) of every split of the study."""
    if mode == "intra":
        out = []
        for t in tasks:
            mine = sorted(k for k in keys if k[0] == t)
            train, test = split_examples(mine, [train_fraction, 1.0 - train_fraction], seed=seed)
            out.append((f"intra:{t}", set(train), set(test)))
        return out
    if mode == "inter":
        train_set = list(train_tasks) if train_tasks else tasks[: max(1, len(tasks) // 2)]
        missing = [t for t in train_set if t not in tasks]
        if missing or len(train_set) >= len(tasks):
            raise ValueError(f"train_tasks={train_set} must be a proper subset of the tasks {tasks}.")
        return [("inter:" + "+".join(train_set), {k for k in keys if k[0] in train_set},
                 {k for k in keys if k[0] not in train_set})]
    return [(f"loto:{t}", {k for k in keys if k[0] != t}, {k for k in keys if k[0] == t}) for t in tasks]


def _records(clf, table, lengths, cfg, split, train_names, model_name):
    L = int(table.num_layers.max())
    exit_layer, _ = simulate_exits(clf, table)
    token = lens_top_tokens(table)[np.arange(table.num_prompts), exit_layer - 1]
    flops = flops_ratio(exit_layer, L, cfg.hidden_size, lengths, cfg.vocab_size)
    out = []
    for task, shots in dict.fromkeys(zip(table.task.tolist(), table.shots.tolist(), strict=True)):
        m = (table.task == task) & (table.shots == shots)
        lay = exit_layer[m].astype(np.float64)
        out.append({
            "task": task, "shots": int(shots), "method": "adainfer", "split": split, "train_tasks": train_names,
            "model": model_name, "n": int(m.sum()), "accuracy": float((token[m] == table.gold_token[m]).mean()),
            "accuracy_dense": float((table.final_token[m] == table.gold_token[m]).mean()),
            "agreement_with_dense": float((token[m] == table.final_token[m]).mean()), "exact_match": None,
            "mean_layers": float(lay.mean()), "var_layers": float(lay.var()), "pruning_ratio": 1 - lay.mean() / L,
            "flops_ratio": float(flops[m].mean()), "seconds": None,
            "calibration": (clf.calibration or {}).get("conclusion"),
        })
    return out


def generalization_study(model, tokenizer, tasks, mode: str, shots: Sequence[int] = (0, 5), limit: int = 40,
                         method: str = "svm", features: Sequence[str] = ("gap", "top_prob"),
                         target_agreement: float = 0.99, train_fraction: float = 0.5,
                         calibration_fraction: float = 0.5, train_tasks: Sequence[str] | None = None,
                         other_model=None, other_tokenizer=None, seed: int = 0, batch_size: int = 8,
                         progress: bool = True) -> dict:
    """Runs one generalization study of the AdaInfer paper (see the module docstring for the modes).

    Args:
        model, tokenizer: the AdaInfer model the classifiers are trained on (model A) and its tokenizer.
        tasks (`Sequence[data.Task]`): at least two tasks for `"inter"`/`"loto"`.
        mode (`str`): one of `STUDY_MODES`.
        shots (`Sequence[int]`), limit (`int`): prompts per task: `limit` examples for each shots value.
        method, features: see `train.train_exit_classifier`. target_agreement: see `calibrate.calibrate`.
        train_fraction (`float`, *optional*, defaults to 0.5): share of a task's examples trained on (`"intra"`).
        calibration_fraction (`float`, *optional*, defaults to 0.5): share of the training examples held out for
            calibration (disjoint from the fitted ones).
        train_tasks (`Sequence[str]`, *optional*): training tasks of `"inter"` (default: the first half).
        other_model, other_tokenizer (*optional*): model B for the inter-model transfer.
        seed, batch_size, progress: split seed, prompts per forward, progress bars.

    Returns:
        `dict`: `{"model", "study", "results": [...]}`; one record per split x test task x shots (x model), with
        the `results.json` keys (`seconds`, `exact_match` are None: decisions are simulated) plus `split`,
        `train_tasks`, `model`, `accuracy_dense`, `agreement_with_dense`, `calibration`.
    """
    if mode not in STUDY_MODES:
        raise ValueError(f"mode={mode!r} is not supported; expected one of {list(STUDY_MODES)}.")
    tasks = list(tasks)
    names = list(dict.fromkeys(t.name for t in tasks))
    if mode != "intra" and len(names) < 2:
        raise ValueError(f"mode={mode!r} needs at least 2 distinct tasks; got {names}.")
    prompts = [p for t in tasks for k in shots for p in build_prompts(t, k, limit=limit, seed=seed)]
    features = tuple(features)
    runs = [(model, tokenizer)] + ([(other_model, other_tokenizer or tokenizer)] if other_model is not None else [])
    tables = []
    for m, tok in runs:
        table = collect_features(m, tok, prompts, features=features, batch_size=batch_size, progress=progress)
        lengths = np.array([len(tok(p.text)["input_ids"]) for p in prompts])
        tables.append((m, table, lengths, getattr(m.config, "_name_or_path", None) or None))
    keys_of = list(zip(tables[0][1].task.tolist(), tables[0][1].example_index.tolist(), strict=True))
    records = []
    for split, train_keys, test_keys in _splits(names, sorted(set(keys_of)), mode, train_tasks, train_fraction,
                                               seed):
        fit_keys, cal_keys = split_examples(sorted(train_keys), [1 - calibration_fraction, calibration_fraction],
                                            seed=seed)
        ids = {}
        for part, chosen in (("fit", set(fit_keys)), ("cal", set(cal_keys)), ("test", set(test_keys))):
            ids[part] = np.flatnonzero([k in chosen for k in keys_of])
        sizes = {part: int(v.size) for part, v in ids.items()}
        if min(sizes.values()) == 0:
            raise ValueError(f"Split {split!r} leaves an empty set of prompts {sizes}; raise limit.")
        table_a = tables[0][1]
        clf = train_exit_classifier(table_a.select_prompts(ids["fit"]), method=method, features=features, seed=seed)
        clf = calibrate(clf, table_a.select_prompts(ids["cal"]), target_agreement=target_agreement).bind(model)
        train_names = sorted({k[0] for k in train_keys})
        for i, (m, table, lengths, name) in enumerate(tables):
            used = clf if i == 0 else transfer_classifier(clf, int(table.num_layers.max()))
            records += _records(used, table.select_prompts(ids["test"]), lengths[ids["test"]], m.config, split,
                                train_names, name)
    return {"model": tables[0][3], "study": mode, "method": method, "target_agreement": target_agreement,
            "decisions": "simulated on the collected test rows (calibrate.simulate_exits)", "results": records}
