"""The feature table: per-layer exit features of a set of prompts, the tokens both labels need, and files.

[`FeatureTable`] is what `collect.collect_features` produces and what training (`train`), calibration
(`calibrate`) and schedule choice (`schedule`) read; [`table_sequences`] regroups its rows per prompt.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_file

__all__ = ["LABEL_KINDS", "TABLE_FORMAT_VERSION", "FeatureTable", "table_sequences"]

TABLE_FORMAT_VERSION = 1
LABEL_KINDS = ("final", "gold")
_ROW_FIELDS = ("X", "layer", "prompt_id", "top_token")
_PROMPT_FIELDS = ("task", "shots", "example_index", "final_token", "gold_token", "num_layers")
_UNIT_FIELDS = ("sequence", "step")


@dataclass
class FeatureTable:
    """Per-layer exit features of a set of prompts, with the tokens both labels of the paper need.

    One row per (prompt, checked layer `1..L-1`); the final layer `L` is the dense output and has no row.

    Args:
        X (`np.ndarray` float32 `[N, F]`): feature values, columns in `feature_names` order.
        feature_names (`tuple[str, ...]`): names from `adainfer_hf.policy.features.FEATURES`.
        layer (`np.ndarray` int `[N]`): 1-based layer of each row.
        prompt_id (`np.ndarray` int `[N]`): index of each row's prompt in the per-prompt arrays.
        top_token (`np.ndarray` int `[N]`): the logit lens' top-1 token at that layer.
        task (`np.ndarray` str `[P]`), shots (`np.ndarray` int `[P]`), example_index (`np.ndarray` int `[P]`):
            where each prompt comes from (`data.Prompt.task`, `.shots`, `.index`).
        final_token (`np.ndarray` int `[P]`): the dense model's top-1 next token.
        gold_token (`np.ndarray` int `[P]`): first token of the gold answer, `-1` when unknown.
        num_layers (`np.ndarray` int `[P]`): decoder layer count `L` of the model that produced the prompt's rows.
        meta (`dict`): free-form JSON-serialisable information (model name, ...).
        hidden (`np.ndarray` float16 `[N, H]`, *optional*): each row's last-token hidden state after its layer
            (before the final norm), what a gate (`policy.gate.LinearGate`) reads; recorded only on request
            (`collect_features(..., hidden_states=True)`).
        sequence (`np.ndarray` int `[P]`, *optional*): the generated sequence each prompt (unit) belongs to;
            defaults to one sequence per prompt. `collect_generation_features` records one unit per generated
            token, and the units of one generation share a sequence (calibration treats sequences, not tokens,
            as its independent draws).
        step (`np.ndarray` int `[P]`, *optional*): which generated token a unit predicts: 0 = the first one (the
            prompt's forward), k >= 1 = the k-th single-token decode step. Defaults to 0.
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
    hidden: np.ndarray | None = None
    sequence: np.ndarray | None = None
    step: np.ndarray | None = None

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.float32).reshape(-1, len(self.feature_names))
        self.feature_names = tuple(self.feature_names)
        for name in _ROW_FIELDS[1:] + _PROMPT_FIELDS[1:]:  # every integer array
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        self.task = np.asarray(self.task, dtype=str).reshape(-1)
        n, p = self.X.shape[0], self.task.shape[0]
        self.sequence = np.arange(p) if self.sequence is None else self.sequence
        self.step = np.zeros(p) if self.step is None else self.step
        for name in _UNIT_FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        for name in _ROW_FIELDS[1:]:
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"FeatureTable.{name} has {getattr(self, name).shape[0]} rows; expected {n} (X)."
                )
        for name in _PROMPT_FIELDS[1:] + _UNIT_FIELDS:
            if getattr(self, name).shape[0] != p:
                raise ValueError(
                    f"FeatureTable.{name} has {getattr(self, name).shape[0]} prompts; expected {p}."
                )
        if self.hidden is not None:
            self.hidden = np.asarray(self.hidden, dtype=np.float16)
            if self.hidden.ndim != 2 or self.hidden.shape[0] != n:
                raise ValueError(f"FeatureTable.hidden has shape {self.hidden.shape}; expected ({n}, hidden_size).")
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

    @property
    def num_sequences(self) -> int:
        """Number of distinct generated sequences (`num_prompts` for a first-token table)."""
        return int(np.unique(self.sequence).size)

    @property
    def is_generation(self) -> bool:
        """True when some sequence holds more than one unit (a `collect_generation_features` table)."""
        return self.num_sequences < self.num_prompts

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
            **{name: getattr(self, name)[ids] for name in _PROMPT_FIELDS + _UNIT_FIELDS},
            meta=dict(self.meta),
            hidden=None if self.hidden is None else self.hidden[rows],
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
        with_hidden = [t.hidden is not None for t in tables]
        if any(with_hidden) and not all(with_hidden):
            raise ValueError("Cannot concat tables with and without hidden states; collect them alike.")
        offsets = np.cumsum([0] + [t.num_prompts for t in tables[:-1]])
        seq_offsets = np.cumsum([0] + [int(t.sequence.max()) + 1 if t.num_prompts else 0 for t in tables[:-1]])
        return cls(
            X=np.concatenate([t.X for t in tables]),
            feature_names=names,
            layer=np.concatenate([t.layer for t in tables]),
            prompt_id=np.concatenate([t.prompt_id + o for t, o in zip(tables, offsets, strict=True)]),
            top_token=np.concatenate([t.top_token for t in tables]),
            **{name: np.concatenate([getattr(t, name) for t in tables]) for name in _PROMPT_FIELDS},
            meta=dict(tables[0].meta),
            hidden=np.concatenate([t.hidden for t in tables]) if all(with_hidden) else None,
            sequence=np.concatenate([t.sequence + o for t, o in zip(tables, seq_offsets, strict=True)]),
            step=np.concatenate([t.step for t in tables]),
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
            f.name: getattr(self, f.name) for f in fields(self)
            if f.name not in ("feature_names", "meta") and getattr(self, f.name) is not None
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


def table_sequences(table: FeatureTable, features: Sequence[str], label: str | None = None):
    """Per-prompt `[L-1, F]` feature sequences (layer order) and, with `label`, their label sequences."""
    X = table.columns(features)
    y = table.labels(label) if label else None
    order = np.lexsort((table.layer, table.prompt_id))
    bounds = np.searchsorted(table.prompt_id[order], np.arange(table.num_prompts + 1))
    seqs = [X[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    labs = None if y is None else [y[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return seqs, labs
