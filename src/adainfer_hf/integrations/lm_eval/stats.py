"""Exit statistics of `--model adainfer`: per-task tallies, the summary table and the sidecar files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ...evaluation.evaluate import flops_ratio
from ...runtime.recording import ExitStatistics
from ...utils.distributed import all_gather, is_distributed

__all__ = ["SIDECAR_PREFIX", "STATS_KEY", "ExitTally", "collecting_stats", "exit_stats_table", "gather_tallies",
           "report_stats", "write_sidecars"]

STATS_KEY = "adainfer_exit_stats"
"""Key of the exit statistics in the harness's `results["config"]` (and in its results JSON)."""

SIDECAR_PREFIX = "adainfer_exit_stats"
"""The CLI writes `<SIDECAR_PREFIX>_<date>.json` beside the harness's `results_<date>.json`."""

FLOPS_FORMULA = "sum n(2l'(6h+s)+V) / sum n(2L(6h+s)+V) over exit decisions"

_LISTENERS: list[Callable[[dict], None]] = []  # filled only inside `collecting_stats`


@dataclasses.dataclass
class ExitTally:
    """Exit statistics of one task (or of all tasks): decisions, FLOPs and model time.

    Args:
        num_layers (`int`): the model's decoder layer count L.
    """

    num_layers: int
    requests: int = 0
    seconds: float = 0.0
    model_calls: int = 0
    flops_run: float = 0.0
    flops_dense: float = 0.0
    request_types: set[str] = dataclasses.field(default_factory=set)
    exits: ExitStatistics | None = None

    def __post_init__(self):
        if self.exits is None:
            self.exits = ExitStatistics(self.num_layers)

    def add(self, exit_layers: torch.Tensor, positions: torch.Tensor, context: torch.Tensor, hidden: int,
            vocab: int) -> None:
        """Counts decisions: `exit_layers`, `positions` (computed) and `context` (length) per decision."""
        layers = exit_layers.detach().cpu().double().flatten().numpy()
        n = positions.detach().cpu().double().flatten().numpy()
        s = context.detach().cpu().double().flatten().numpy()
        self.exits.update(exit_layers.detach().cpu().flatten())
        # The paper's per-decision ratio, weighted by each decision's dense cost (n positions of
        # 2L(6h+s)+V), so the aggregate is total FLOPs run / total dense FLOPs, not a mean of ratios.
        dense = n * (2.0 * self.num_layers * (6.0 * hidden + s) + vocab)
        self.flops_run += float((dense * flops_ratio(layers, self.num_layers, hidden, s, vocab)).sum())
        self.flops_dense += float(dense.sum())

    def as_dict(self) -> dict:
        """JSON-ready summary: requests, decisions, mean exit layer, pruning and FLOPs ratios, histogram."""
        mean = self.exits.mean_layers
        summary = self.exits.as_dict()
        return {
            "request_types": sorted(self.request_types),
            "requests": self.requests,
            "decisions": summary["tokens"],
            "num_layers": self.num_layers,
            "mean_exit_layer": None if math.isnan(mean) else mean,
            "pruning_ratio": None if math.isnan(mean) else 1.0 - mean / self.num_layers,
            "flops_ratio": self.flops_run / self.flops_dense if self.flops_dense else None,
            "model_seconds": self.seconds,
            "model_calls": self.model_calls,
            "exit_histogram": {str(k): v for k, v in summary["histogram"].items()},
        }

    def merge(self, other: ExitTally) -> None:
        """Adds `other`'s counts to this tally."""
        self.requests += other.requests
        self.seconds += other.seconds
        self.model_calls += other.model_calls
        self.flops_run += other.flops_run
        self.flops_dense += other.flops_dense
        self.request_types |= other.request_types
        self.exits.histogram += other.exits.histogram


def gather_tallies(tallies: dict[str, ExitTally]) -> dict[str, ExitTally]:
    """Every process's per-task tallies, merged task by task (`tallies` itself without a process group).

    Under the harness's data parallelism (`accelerate launch`) each process runs its share of every task's
    requests and counts them; this collective (every process must call it) gives each one the whole run: the
    histograms, decisions, requests and FLOPs summed, `model_seconds` summed over the processes."""
    if not is_distributed():
        return tallies
    merged: dict[str, ExitTally] = {}
    for part in all_gather(tallies):
        for name, tally in sorted(part.items()):
            merged.setdefault(name, ExitTally(tally.num_layers)).merge(tally)
    return merged


def report_stats(stats: dict) -> None:
    """Hands `stats` to every `collecting_stats` block now running (called from `AdaInferLM.get_model_info`)."""
    for listener in list(_LISTENERS):
        listener(stats)


@contextlib.contextmanager
def collecting_stats() -> Iterator[list[dict]]:
    """Collects the statistics every `AdaInferLM` reports while the block runs."""
    collected: list[dict] = []
    _LISTENERS.append(collected.append)
    try:
        yield collected
    finally:
        _LISTENERS.remove(collected.append)


def exit_stats_table(stats: dict) -> str:
    """A Markdown table of `AdaInferLM.exit_statistics()` (one line per task, then all tasks).

    Args:
        stats (`dict`): the statistics, e.g. `results["config"]["adainfer_exit_stats"]`.
    """

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"AdaInfer exit statistics ({stats.get('exit_policy')}, L = {stats.get('num_layers')})",
        "",
        "|Task|Requests|Decisions|Mean exit layer|Pruning ratio|FLOPs ratio|Model s|",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [*stats.get("tasks", {}).items(), ("all", stats["all"])] if "all" in stats else []
    for name, s in rows:
        lines.append(
            f"|{name}|{s['requests']}|{s['decisions']}|{fmt(s['mean_exit_layer'], '.2f')}|"
            f"{fmt(s['pruning_ratio'], '.4f')}|{fmt(s['flops_ratio'], '.4f')}|{s['model_seconds']:.2f}|")
    return "\n".join(lines)


def output_path(argv: Sequence[str]) -> Path | None:
    """The harness's `--output_path` / `-o` in `argv` (only peeked at: argv goes to the harness unchanged)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", "-o", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return Path(known.output_path) if known.output_path else None


def results_files(path: Path | None) -> set[Path]:
    """The harness's aggregated-results files under its `--output_path` (see `EvaluationTracker`)."""
    if path is None:
        return set()
    if path.suffix == ".json":
        return set(path.parent.glob(f"{path.stem}_*.json"))
    return set(path.glob("*/results_*.json")) if path.is_dir() else set()


def write_sidecars(path: Path, new_results: set[Path], stats: dict) -> list[Path]:
    """Writes `stats` as `<SIDECAR_PREFIX>_<date>.json` beside each new results file; returns the files written.

    Args:
        path (`Path`): the harness's `--output_path`.
        new_results (`set[Path]`): results files the run wrote (none: one sidecar where they would have gone).
        stats (`dict`): `AdaInferLM.exit_statistics()`.
    """
    written = []
    for results_file in sorted(new_results) or [None]:
        if results_file is None:
            folder = path.parent if path.suffix == ".json" else path
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{SIDECAR_PREFIX}.json"
        else:
            date = results_file.stem.rsplit("_", 1)[-1]
            target = results_file.with_name(f"{SIDECAR_PREFIX}_{date}.json")
        payload = {**stats, "results_file": None if results_file is None else results_file.name}
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, target)
        written.append(target)
    return written
