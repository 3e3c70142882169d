"""Feature collection: run the model's own exit loop once per prompt batch and record every layer.

The features are computed by the decoder loop itself (`loop.ExitRun._check` → `features.compute_features`),
through a policy that checks every layer, never fires, and stores what it sees. Training data and live
decisions therefore share one code path: a classifier trained on a [`FeatureTable`] reads exactly the numbers
it will get at inference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import architectures as arch
from .atomic import atomic_file
from .features import FEATURES
from .policy import ExitPolicy, check_dtype_or_raise

__all__ = ["FeatureTable", "RecordingPolicy", "collect_features", "load_adainfer_model"]

TABLE_FORMAT_VERSION = 1
LABEL_KINDS = ("final", "gold")
_ROW_FIELDS = ("X", "layer", "prompt_id", "top_token")
_PROMPT_FIELDS = ("task", "shots", "example_index", "final_token", "gold_token", "num_layers")


@dataclass
class FeatureTable:
    """Per-layer exit features of a set of prompts, with the tokens both labels of the paper need.

    One row per (prompt, checked layer `1..L-1`); the final layer `L` is the dense output and has no row.

    Args:
        X (`np.ndarray` float32 `[N, F]`): feature values, columns in `feature_names` order.
        feature_names (`tuple[str, ...]`): names from `adainfer_hf.features.FEATURES`.
        layer (`np.ndarray` int `[N]`): 1-based layer of each row.
        prompt_id (`np.ndarray` int `[N]`): index of each row's prompt in the per-prompt arrays.
        top_token (`np.ndarray` int `[N]`): the logit lens' top-1 token at that layer.
        task (`np.ndarray` str `[P]`), shots (`np.ndarray` int `[P]`), example_index (`np.ndarray` int `[P]`):
            where each prompt comes from (`data.Prompt.task`, `.shots`, `.index`).
        final_token (`np.ndarray` int `[P]`): the dense model's top-1 next token.
        gold_token (`np.ndarray` int `[P]`): first token of the gold answer, `-1` when unknown.
        num_layers (`np.ndarray` int `[P]`): decoder layer count `L` of the model that produced the prompt's rows.
        meta (`dict`): free-form JSON-serialisable information (model name, ...).
    """

    X: np.ndarray
    feature_names: tuple[str, ...]
    layer: np.ndarray
    prompt_id: np.ndarray
    top_token: np.ndarray
    task: np.ndarray
    shots: np.ndarray
    example_index: np.ndarray
    final_token: np.ndarray
    gold_token: np.ndarray
    num_layers: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.float32).reshape(-1, len(self.feature_names))
        self.feature_names = tuple(self.feature_names)
        for name in _ROW_FIELDS[1:] + _PROMPT_FIELDS[1:]:  # every integer array
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        self.task = np.asarray(self.task, dtype=str).reshape(-1)
        n, p = self.X.shape[0], self.task.shape[0]
        for name in _ROW_FIELDS[1:]:
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"FeatureTable.{name} has {getattr(self, name).shape[0]} rows; expected {n} (X)."
                )
        for name in _PROMPT_FIELDS[1:]:
            if getattr(self, name).shape[0] != p:
                raise ValueError(
                    f"FeatureTable.{name} has {getattr(self, name).shape[0]} prompts; expected {p}."
                )
        if n and (self.prompt_id.min() < 0 or self.prompt_id.max() >= p):
            raise ValueError(
                f"FeatureTable.prompt_id must lie in [0, {p}); got range "
                f"[{self.prompt_id.min()}, {self.prompt_id.max()}]."
            )

    # ------------------------------------------------------------------ views
    @property
    def num_prompts(self) -> int:
        """Number of prompts `P`."""
        return int(self.task.shape[0])

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The feature matrix restricted to `names`, in that order (float32 `[N, len(names)]`)."""
        missing = [n for n in names if n not in self.feature_names]
        if missing:
            raise ValueError(
                f"Feature(s) {missing} were not collected; this table has {list(self.feature_names)}."
            )
        return self.X[:, [self.feature_names.index(n) for n in names]]

    def labels(self, kind: str = "final") -> np.ndarray:
        """Binary per-row labels (int64 `[N]`): 1 where exiting at the row's layer would be right.

        Args:
            kind (`str`, *optional*, defaults to `"final"`): `"final"` (the layer's top-1 equals the dense model's
                top-1: exiting would not change the output) or `"gold"` (it equals the gold answer's first token).
        """
        if kind == "final":
            return (self.top_token == self.final_token[self.prompt_id]).astype(np.int64)
        if kind == "gold":
            if (self.gold_token < 0).any():
                raise ValueError(
                    "label='gold' needs gold tokens, but some prompts were collected without an answer."
                )
            return (self.top_token == self.gold_token[self.prompt_id]).astype(np.int64)
        raise ValueError(f"label kind {kind!r} is not supported; expected one of {list(LABEL_KINDS)}.")

    @property
    def has_gold(self) -> bool:
        """True when every prompt has a gold token."""
        return bool(self.num_prompts) and bool((self.gold_token >= 0).all())

    def select_prompts(self, ids) -> FeatureTable:
        """A table with only the prompts `ids` (in that order), renumbered `0..len(ids)-1`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_prompts):
            raise ValueError(f"prompt ids must lie in [0, {self.num_prompts}); got {ids.min()}..{ids.max()}.")
        new_id = np.full(self.num_prompts, -1, dtype=np.int64)
        new_id[ids] = np.arange(ids.size)
        keep = new_id[self.prompt_id] >= 0
        order = np.argsort(new_id[self.prompt_id[keep]], kind="stable")
        rows = np.flatnonzero(keep)[order]
        return FeatureTable(
            X=self.X[rows],
            feature_names=self.feature_names,
            layer=self.layer[rows],
            prompt_id=new_id[self.prompt_id[rows]],
            top_token=self.top_token[rows],
            **{name: getattr(self, name)[ids] for name in _PROMPT_FIELDS},
            meta=dict(self.meta),
        )

    @classmethod
    def concat(cls, tables: Sequence[FeatureTable]) -> FeatureTable:
        """Stacks tables with the same feature columns (prompt ids are shifted)."""
        if not tables:
            raise ValueError("concat needs at least one FeatureTable; got none.")
        names = tables[0].feature_names
        for t in tables[1:]:
            if t.feature_names != names:
                raise ValueError(
                    f"Cannot concat tables with features {list(t.feature_names)} and {list(names)}."
                )
        offsets = np.cumsum([0] + [t.num_prompts for t in tables[:-1]])
        return cls(
            X=np.concatenate([t.X for t in tables]),
            feature_names=names,
            layer=np.concatenate([t.layer for t in tables]),
            prompt_id=np.concatenate([t.prompt_id + o for t, o in zip(tables, offsets, strict=True)]),
            top_token=np.concatenate([t.top_token for t in tables]),
            **{name: np.concatenate([getattr(t, name) for t in tables]) for name in _PROMPT_FIELDS},
            meta=dict(tables[0].meta),
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes one `.npz` file (arrays plus a JSON `meta` entry), atomically: temp file, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": TABLE_FORMAT_VERSION,
            "feature_names": list(self.feature_names),
            "meta": self.meta,
        }
        arrays = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("feature_names", "meta")
        }
        with atomic_file(path, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureTable:
        """Reads a table written by [`~FeatureTable.save`] (no pickle is ever loaded)."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"{os.fspath(path)!r} is not a FeatureTable .npz file: {err}") from err
        if "meta" not in arrays:
            raise ValueError(
                f"{os.fspath(path)!r} has no 'meta' entry; expected a file written by FeatureTable.save."
            )
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format_version", 0) > TABLE_FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has format_version={meta['format_version']}; this adainfer-hf "
                f"reads up to {TABLE_FORMAT_VERSION}."
            )
        return cls(feature_names=tuple(meta["feature_names"]), meta=meta.get("meta", {}), **arrays)

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes one line per row: prompt metadata, layer, features, top token and both labels."""
        import csv

        gold = self.labels("gold") if self.has_gold else np.full(len(self), -1)
        final = self.labels("final")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ["prompt_id", "task", "shots", "layer", *self.feature_names]
        header += ["top_token", "final_token", "gold_token", "label_final", "label_gold"]
        with atomic_file(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(len(self)):
                p = self.prompt_id[i]
                prompt = [p, self.task[p], self.shots[p], self.layer[i]]
                tokens = [self.top_token[i], self.final_token[p], self.gold_token[p], final[i], gold[i]]
                w.writerow([*prompt, *(f"{v:.6g}" for v in self.X[i]), *tokens])


class RecordingPolicy(ExitPolicy):
    """Checks every layer `1..L-1`, never exits, and stores each row's features and top-1 token per layer.

    It relies on the decoder loop's optional `record(layer, rows, feats, stats, logits)` hook, called after the
    features of a checked layer are computed; `decide` always answers "keep going".

    Args:
        features (`Sequence[str]`): feature names to compute, in column order.
        batch_size (`int`), num_layers (`int`): shape of the forward call about to run.
        check_dtype (`str`, *optional*): LM-head dtype of the checks (see `policy.CHECK_DTYPES`).
    """

    def __init__(self, features: Sequence[str], batch_size: int, num_layers: int, check_dtype: str | None = None):
        self.features = tuple(features)
        self.min_layer = 1
        self.check_layers = None
        self.check_dtype = check_dtype
        self.feats = torch.full((batch_size, num_layers - 1, len(self.features)), float("nan"))
        self.top_token = torch.full((batch_size, num_layers - 1), -1, dtype=torch.long)

    def record(self, layer, rows, feats, stats, logits) -> None:
        """Stores the features and the logit lens' top-1 of `rows` after `layer` (1-based)."""
        r = rows.to("cpu")
        self.feats[r, layer - 1] = feats.detach().to("cpu", torch.float32)
        self.top_token[r, layer - 1] = stats.top_token.detach().to("cpu")

    def decide(self, features, layer, rows):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def collect_features(
    model,
    tokenizer,
    prompts,
    features: Sequence[str] = tuple(FEATURES),
    batch_size: int = 8,
    progress: bool = True,
    check_dtype: str | None = None,
) -> FeatureTable:
    """Collects per-layer exit features for `prompts` with one forward per batch through the model's exit loop.

    Args:
        model (`AdaInferLlamaForCausalLM` or `AdaInferOPTForCausalLM`): the model (its exit classifier is ignored).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; prompts are left-padded.
        prompts (`Sequence[data.Prompt]`): prompts, e.g. from `data.build_prompts`; `answer` may be empty (then
            `gold_token` is -1).
        features (`Sequence[str]`, *optional*, defaults to every name in `FEATURES`): what to record.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        check_dtype (`str`, *optional*): compute the logit lens with the LM head in this dtype ("bfloat16",
            "float16"), as a classifier with the same `check_dtype` will at run time; recorded in `meta`.

    Returns:
        [`FeatureTable`]: rows ordered by prompt, then layer.
    """
    from tqdm.auto import tqdm

    from .data import gold_first_token

    if not hasattr(model, "set_exit_classifier"):
        raise TypeError(
            f"collect_features needs an AdaInfer model class; got {type(model).__name__} "
            "(load it with load_adainfer_model)."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    check_dtype_or_raise(check_dtype)
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"Unknown feature(s) {unknown or features}; expected names from {sorted(FEATURES)}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("collect_features got no prompts.")
    L = arch.num_layers(model)
    P, F = len(prompts), len(features)
    feats = np.zeros((P, L - 1, F), dtype=np.float32)
    tops = np.zeros((P, L - 1), dtype=np.int64)
    final = np.zeros(P, dtype=np.int64)
    gold = np.array(
        [gold_first_token(tokenizer, p.text, p.answer) if p.answer.strip() else -1 for p in prompts],
        dtype=np.int64,
    )
    device = next(model.parameters()).device

    old_side, old_pad, was_training = tokenizer.padding_side, tokenizer.pad_token, model.training
    tokenizer.padding_side = "left"  # the last real token sits at the last position of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        # Batches of similar length waste less compute on padding; results go back to each prompt's own slot.
        lengths = [len(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts]
        order = np.argsort(lengths, kind="stable")
        model.eval()
        batches = [order[i : i + batch_size] for i in range(0, P, batch_size)]
        with torch.no_grad():
            for idx in tqdm(batches, desc="collecting features", unit="batch", disable=not progress):
                enc = tokenizer([prompts[i].text for i in idx], return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items()}
                policy = RecordingPolicy(features, len(idx), L, check_dtype=check_dtype)
                out = model(**enc, use_cache=False, logits_to_keep=1, exit_policy=policy)
                if bool((policy.top_token < 0).any()):
                    raise RuntimeError(
                        "The exit loop did not record every layer; is `record` called by loop.py?"
                    )
                feats[idx] = policy.feats.numpy()
                tops[idx] = policy.top_token.numpy()
                final[idx] = out.logits[:, -1].argmax(-1).cpu().numpy()
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        model.train(was_training)

    layers = np.arange(1, L, dtype=np.int64)
    return FeatureTable(
        X=feats.reshape(-1, F),
        feature_names=features,
        layer=np.tile(layers, P),
        prompt_id=np.repeat(np.arange(P, dtype=np.int64), L - 1),
        top_token=tops.reshape(-1),
        task=[p.task for p in prompts],
        shots=[p.shots for p in prompts],
        example_index=[p.index for p in prompts],
        final_token=final,
        gold_token=gold,
        num_layers=np.full(P, L, dtype=np.int64),
        meta={"model": getattr(model.config, "_name_or_path", None) or None, "check_dtype": check_dtype},
    )


def load_adainfer_model(name_or_path: str | os.PathLike, **kwargs):
    """Loads a checkpoint with the AdaInfer class matching its `model_type` (`llama` or `opt`).

    Args:
        name_or_path (`str` or `os.PathLike`): a local directory, a Hub id, or `"default"` for the embedded
            SmolLM2-135M-Instruct (`default_model.default_model_dir()`).
        kwargs: passed to `from_pretrained` (`dtype`, `revision`, `exit_classifier`, ...).

    Returns:
        `AdaInferLlamaForCausalLM` or `AdaInferOPTForCausalLM`, in eval mode.
    """
    from transformers import AutoConfig

    from .modeling import AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM

    if os.fspath(name_or_path) == "default":
        from .default_model import default_model_dir

        name_or_path = default_model_dir()
    config_kwargs = {
        k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs
    }
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    classes = {"llama": AdaInferLlamaForCausalLM, "opt": AdaInferOPTForCausalLM}
    if config.model_type not in classes:
        raise NotImplementedError(
            f"{os.fspath(name_or_path)!r} has model_type={config.model_type!r}; adainfer_hf "
            f"supports {sorted(classes)}."
        )
    return classes[config.model_type].from_pretrained(name_or_path, **kwargs).eval()
