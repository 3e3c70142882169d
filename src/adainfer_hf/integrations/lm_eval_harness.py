"""lm-evaluation-harness (`lm-eval` 0.4.x) with early exit: the model type `adainfer`.

[`AdaInferLM`] subclasses the harness's own `HFLM` (`--model hf`), so batching, `loglikelihood`,
`loglikelihood_rolling`, `generate_until`, chat templates and every `HFLM` model argument behave as with
`--model hf`; only the model is an AdaInfer class (picked from the checkpoint's `config.model_type`, see
[`ADAINFER_CLASSES`]) and every forward may exit early.

Running it:

```bash
adainfer lm-eval --model adainfer --device cpu --tasks TASKS --output_path out/ \\
    --model_args pretrained=DIR_OR_ID,exit_classifier=DIR_OR_ID,exit_cache=propagate,dtype=float32
python -m adainfer_hf.integrations.lm_eval_harness ...     # the same entry point, `main(argv)`
```

```python
>>> import lm_eval
>>> from adainfer_hf.integrations.lm_eval_harness import AdaInferLM
>>> lm = AdaInferLM(pretrained=adainfer_model, tokenizer=tokenizer, batch_size=8)   # an already-loaded model
>>> results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"])
>>> results["config"]["adainfer_exit_stats"]["tasks"]["my_task"]["mean_exit_layer"]
```

**Discovery.** lm-eval 0.4.13 looks model names up in `lm_eval.api.registry.model_registry`, which it fills from
its own `lm_eval.models.MODEL_MAPPING`; it reads no entry points and has no plugin option, so a plain
`lm_eval --model adainfer` cannot find an external model. Importing this module registers `adainfer` (lazily, with
the registry's `"module:Class"` placeholder); [`main`] imports it and hands its arguments unchanged to the
harness's own CLI (`lm_eval.__main__.cli_evaluate`), then writes the exit statistics. In Python, import this
module before `lm_eval.simple_evaluate(model="adainfer", ...)`.

**Model arguments** (`--model_args`), besides everything `HFLM` takes (`dtype`, `batch_size`, `max_length`,
`parallelize`/`device_map`, `peft`, ...):

- `pretrained`: a local directory or Hub id of a stock Llama/OPT checkpoint, or an already-loaded AdaInfer model.
- `exit_classifier`: a directory or Hub id of an `ExitClassifier`, `none` (never exit), or `auto` (the default: the
  artifact saved beside the checkpoint, when there is one; with a loaded model, its current classifier). Also
  `trust_remote_classifier` and `ignore_classifier_mismatch`, as in `from_pretrained`.
- `exit_layer`: an int k; every row exits after layer k (`ScriptedExit`), i.e. the stock model cut to k layers.
- `exit_cache`: `propagate` (default) or `exact`: the KV-cache option of `generate` (only `generate_until` uses a
  cache; scoring forwards run without one).
- `device` defaults to `cuda` when available, else `cpu` (`HFLM` always defaults to `cuda`). As with
  `--model hf`, `device_map` only takes effect together with `parallelize=True`.

**What loglikelihood scoring means under early exit.** The harness scores a continuation from the logits at every
continuation position of one forward row (context + continuation, minus the last token). The model decides once per
row, on the row's last real token, and a row that exits after layer k returns, at every position, the logit lens
at k (final norm and LM head applied to the layer-k hidden states, which stop changing when the row exits):
*each row's logits at every position come from the layer that row exited at, decided on the row's last real
token*. So a request's log-likelihood is that of the model cut to its row's exit layer. Consequences:

- One-token choices of a multiple-choice question share one row (`HFLM`'s logits cache): they are scored at the
  same depth. Choices of several tokens are rows of their own, each decided on its own last token, so the choices of
  one question may be scored at different depths.
- `HFLM` right-pads scoring batches and calls the model without an attention mask (harmless for a causal model,
  but the exit would be decided on a pad token). [`AdaInferLM`] recovers each row's real length from the requests of
  the current call (a row is a known input followed by zero padding; `HFLM` sorts rows longest first, which makes
  the match exact) and passes the mask whenever the exit policy checks prompt forwards; otherwise the call is
  exactly `--model hf`'s.
- `loglikelihood_rolling` windows are rows like any other; `generate_until` exits at every generated token, the
  prompt step included, with the `exit_cache` option.

**Exit statistics.** Requests are evaluated task by task (each harness call is split by `Instance.task_name`, so
every forward row belongs to one task; batches never mix tasks, which is the only difference from `--model hf`'s
batching). Per task and over all tasks: requests, exit decisions (one per forward row, and per row and generated
token in `generate_until`), the mean exit layer, the pruning ratio `1 - mean / L`, the exit-layer histogram, the
paper's FLOPs ratio and the wall-clock seconds of the model calls (forward and `generate`). The FLOPs ratio is
`sum n (2 l'(6h + s) + V) / sum n (2 L (6h + s) + V)` over decisions: `l'` layers run, `n` positions the forward
computed (the row's length in a prompt forward, 1 in a decode step), `s` the row's context length, `h` the hidden
size, `V` the vocabulary; it leaves out the exit checks' LM heads, as the paper does. The statistics land in the
harness's results under `results["config"]["adainfer_exit_stats"]` (hence in its results JSON), [`main`] also
writes them to a sidecar `adainfer_exit_stats_<date>.json` beside the harness's `results_<date>.json` and prints
a table after the harness's. Under `accelerate launch` data parallelism each process counts its own requests
and the reported statistics are rank 0's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

import adainfer_hf
from adainfer_hf import CACHE_MODES, ExitClassifier, ExitPolicy, ExitStatistics, ScriptedExit

__all__ = [
    "ADAINFER_CLASSES",
    "MODEL_NAME",
    "SIDECAR_PREFIX",
    "STATS_KEY",
    "AdaInferAutoForCausalLM",
    "AdaInferLM",
    "exit_stats_table",
    "main",
]

MODEL_NAME = "adainfer"
"""The harness model type (`--model adainfer`)."""

STATS_KEY = "adainfer_exit_stats"
"""Key of the exit statistics in the harness's `results["config"]` (and in its results JSON)."""

SIDECAR_PREFIX = "adainfer_exit_stats"
"""[`main`] writes `<SIDECAR_PREFIX>_<date>.json` beside the harness's `results_<date>.json`."""

ADAINFER_CLASSES = {"llama": "AdaInferLlamaForCausalLM", "opt": "AdaInferOPTForCausalLM"}
"""`config.model_type` -> name of the public `adainfer_hf` class that loads it."""

_AUTO = "auto"
_UNNAMED_TASK = "<unnamed>"
_MODULE = __spec__.name if __spec__ is not None else __name__  # the real name, also under `python -m`
_STATS_LISTENERS: list[Callable[[dict], None]] = []  # filled only while `main` runs (see `_collecting_stats`)


def _adainfer_class(model_type: str) -> type:
    if model_type not in ADAINFER_CLASSES:
        raise NotImplementedError(
            f"model_type={model_type!r} has no AdaInfer class; --model {MODEL_NAME} supports "
            f"{sorted(ADAINFER_CLASSES)}."
        )
    return getattr(adainfer_hf, ADAINFER_CLASSES[model_type])


def _is_adainfer_model(model: Any) -> bool:
    return isinstance(model, tuple(getattr(adainfer_hf, name) for name in ADAINFER_CLASSES.values()))


class AdaInferAutoForCausalLM:
    """Loads a checkpoint with the AdaInfer class of its `config.model_type` (see [`ADAINFER_CLASSES`]).

    `HFLM` loads through its `AUTO_MODEL_CLASS.from_pretrained`; this is ours, so that `HFLM`'s own loading code
    (dtype, device placement, `parallelize`, PEFT, delta weights) runs unchanged.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Reads the checkpoint's config and calls the matching AdaInfer class's `from_pretrained`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local directory or Hub id.
            kwargs: passed to `from_pretrained` (`dtype`, `revision`, `exit_classifier`, ...).

        Raises:
            `NotImplementedError`: the checkpoint's `model_type` has no AdaInfer class.
        """
        from transformers import AutoConfig

        config_keys = ("revision", "subfolder", "trust_remote_code", "cache_dir", "token", "local_files_only",
                       "gguf_file")
        config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in config_keys if kwargs.get(k) is not None})
        model_cls = _adainfer_class(config.model_type)
        return model_cls.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass
class _Tally:
    """Exit statistics of one task (or of all tasks)."""

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
        layers = exit_layers.detach().cpu().double().flatten()
        n = positions.detach().cpu().double().flatten()
        s = context.detach().cpu().double().flatten()
        self.exits.update(exit_layers.detach().cpu().flatten())
        per_layer = 2.0 * (6.0 * hidden + s)
        self.flops_run += float((n * (layers * per_layer + vocab)).sum())
        self.flops_dense += float((n * (self.num_layers * per_layer + vocab)).sum())

    def as_dict(self) -> dict:
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

    def merge(self, other: _Tally) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.model_calls += other.model_calls
        self.flops_run += other.flops_run
        self.flops_dense += other.flops_dense
        self.request_types |= other.request_types
        self.exits.histogram += other.exits.histogram


class _RowLengths:
    """Real lengths of `HFLM`'s right-padded scoring rows, from the inputs the current call will run.

    `HFLM._loglikelihood_tokens` pads each row (one known input) with zeros and passes no mask. A row's length is
    the longest known input that it starts with and after which it holds only zeros; each input is consumed once.
    `HFLM` runs rows longest first, so when one input is another followed by token 0, the longer is run first and
    the match stays exact.
    """

    def __init__(self, inputs: Iterable[tuple[int, ...]]):
        self._remaining = Counter(inputs)
        self._lengths = sorted({len(x) for x in self._remaining}, reverse=True)
        self.missed = 0

    def resolve(self, rows: torch.Tensor) -> list[int | None]:
        """Each row's real length, or None for a row that is no known input (e.g. `HFLM`'s batch-size probe)."""
        out: list[int | None] = []
        for row in rows.tolist():
            total = len(row)
            trailing = 0
            while trailing < total and row[total - 1 - trailing] == 0:
                trailing += 1
            found = None
            for length in self._lengths:
                if length > total:
                    continue
                if length < total - trailing:
                    break
                key = tuple(row[:length])
                if self._remaining[key] > 0:
                    self._remaining[key] -= 1
                    found = length
                    break
            if found is None:
                self.missed += 1
            out.append(found)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- the model
class AdaInferLM(HFLM):
    """lm-evaluation-harness model `adainfer`: the harness's `HFLM` around an AdaInfer early-exit model.

    Args:
        pretrained (`str` or AdaInfer model):
            A local directory or Hub id of a stock Llama/OPT checkpoint (loaded with the AdaInfer class of its
            `model_type`), or an already-loaded `AdaInferLlamaForCausalLM` / `AdaInferOPTForCausalLM`.
        exit_classifier (`str`, `os.PathLike`, `ExitPolicy` or `None`, *optional*, defaults to `"auto"`):
            A directory or Hub id of an `ExitClassifier`, a policy instance, `None` / `"none"` (never exit), or
            `"auto"`: the artifact saved beside the checkpoint when there is one (with a loaded model: keep its
            current classifier).
        exit_layer (`int`, *optional*):
            Exit every row after this layer (`ScriptedExit`): the stock model cut to `exit_layer` layers. Not
            together with an explicit `exit_classifier`.
        exit_cache (`str`, *optional*, defaults to `"propagate"`):
            KV-cache option of `generate` (`"propagate"` or `"exact"`, see `AdaInferLlamaForCausalLM.generate`).
        trust_remote_classifier (`bool`, *optional*, defaults to `False`):
            Allow unpickling a joblib classifier downloaded from the Hub.
        ignore_classifier_mismatch (`bool`, *optional*, defaults to `False`):
            Warn instead of raising when the classifier was made for another model.
        kwargs:
            Everything `lm_eval.models.huggingface.HFLM` takes (`tokenizer`, `dtype`, `batch_size`, `device`,
            `max_length`, `parallelize`, `device_map`, ...). `device` defaults to `"cuda"` when available, else
            `"cpu"`.

    The exit statistics of everything evaluated since creation (or [`reset_exit_statistics`]) are
    [`exit_statistics`], and are added to the harness's results as `results["config"]["adainfer_exit_stats"]`.
    """

    AUTO_MODEL_CLASS = AdaInferAutoForCausalLM

    def __init__(
        self,
        pretrained: str | os.PathLike | Any,
        exit_classifier: str | os.PathLike | ExitPolicy | None = _AUTO,
        exit_layer: int | None = None,
        exit_cache: str = "propagate",
        trust_remote_classifier: bool = False,
        ignore_classifier_mismatch: bool = False,
        **kwargs,
    ) -> None:
        if exit_cache not in CACHE_MODES:
            raise ValueError(f"exit_cache must be one of {list(CACHE_MODES)}; got {exit_cache!r}.")
        if isinstance(exit_classifier, str) and exit_classifier.lower() == "none":
            exit_classifier = None
        if exit_layer is not None:
            if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1:
                raise ValueError(f"exit_layer must be an int >= 1; got {exit_layer!r}.")
            if exit_classifier is not None and exit_classifier != _AUTO:
                raise ValueError(
                    f"Pass exit_layer or exit_classifier, not both; got exit_layer={exit_layer!r} and "
                    f"exit_classifier={exit_classifier!r}.")
            exit_classifier = ScriptedExit(exit_layer)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        loaded = not isinstance(pretrained, (str, os.PathLike))
        if loaded and not _is_adainfer_model(pretrained):
            raise TypeError(
                f"--model {MODEL_NAME} needs pretrained= a checkpoint path/id or an AdaInfer model "
                f"({', '.join(ADAINFER_CLASSES.values())}); got {type(pretrained).__name__}. Use --model hf for "
                "stock models.")
        if not loaded:
            pretrained = os.fspath(pretrained)
            if exit_classifier != _AUTO:
                kwargs["exit_classifier"] = exit_classifier
            kwargs.update(trust_remote_classifier=trust_remote_classifier,
                          ignore_classifier_mismatch=ignore_classifier_mismatch)
        super().__init__(pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"--model {MODEL_NAME} evaluates causal LMs; this model's backend is {self.backend!r}.")
        if not _is_adainfer_model(self.model):
            raise TypeError(f"Loading {pretrained!r} gave {type(self.model).__name__}, not an AdaInfer model "
                            "(PEFT-wrapped models are not supported).")
        if loaded and exit_classifier != _AUTO:
            if isinstance(exit_classifier, (str, os.PathLike)):
                exit_classifier = ExitClassifier.from_pretrained(
                    exit_classifier, trust_remote_classifier=trust_remote_classifier)
            self.model.set_exit_classifier(exit_classifier, ignore_mismatch=ignore_classifier_mismatch)
        self.exit_cache = exit_cache
        self._num_layers = self.model.exit_stats.num_layers
        text_config = self.model.config.get_text_config()
        self._hidden_size = int(text_config.hidden_size)
        self._vocab = int(text_config.vocab_size)
        self._tallies: dict[str, _Tally] = {}
        self._task: _Tally | None = None  # the task whose requests run now (set by `_per_task`)
        self._row_lengths: _RowLengths | None = None  # set while `_loglikelihood_tokens` runs

    # ------------------------------------------------------------------ statistics
    def exit_statistics(self) -> dict:
        """Exit statistics per task and over all tasks, as plain JSON-ready Python.

        Returns:
            `dict`: `{"model", "num_layers", "exit_policy", "exit_cache", "flops_formula", "tasks": {task: {...}},
            "all": {...}}`; each entry has `requests`, `decisions`, `mean_exit_layer`, `pruning_ratio`,
            `flops_ratio`, `model_seconds`, `model_calls`, `exit_histogram` and `request_types`.
        """
        total = _Tally(self._num_layers)
        for tally in self._tallies.values():
            total.merge(tally)
        return {
            "model": getattr(self.model.config, "_name_or_path", None) or None,
            "num_layers": self._num_layers,
            "exit_policy": repr(self.model.exit_classifier),
            "exit_cache": self.exit_cache,
            "flops_formula": "sum n(2l'(6h+s)+V) / sum n(2L(6h+s)+V) over exit decisions",
            "tasks": {name: tally.as_dict() for name, tally in sorted(self._tallies.items())},
            "all": total.as_dict(),
        }

    def reset_exit_statistics(self) -> None:
        """Forgets the statistics gathered so far."""
        self._tallies.clear()

    def get_model_info(self) -> dict:
        """`HFLM.get_model_info` plus the exit statistics under [`STATS_KEY`] (the harness adds it to its results)."""
        info = super().get_model_info()
        stats = self.exit_statistics()
        info[STATS_KEY] = stats
        for listener in list(_STATS_LISTENERS):
            listener(stats)
        return info

    def _per_task(self, requests: list, run: Callable[[list], list], request_type: str) -> list:
        """Runs `requests` task by task (so every forward is attributed to one task), in their original order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(getattr(request, "task_name", None) or _UNNAMED_TASK, []).append(i)
        results: list = [None] * len(requests)
        for task, indices in groups.items():
            tally = self._tallies.setdefault(task, _Tally(self._num_layers))
            tally.requests += len(indices)
            tally.request_types.add(request_type)
            previous, self._task = self._task, tally
            try:
                outputs = run([requests[i] for i in indices])
            finally:
                self._task = previous
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
        return results

    # ------------------------------------------------------------------ the harness's request types
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`HFLM.loglikelihood`, task by task, with early exit in every scoring forward (see the module docs)."""
        return self._per_task(requests, functools.partial(super().loglikelihood, disable_tqdm=disable_tqdm),
                              "loglikelihood")

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """`HFLM.loglikelihood_rolling`, task by task; each window is a row that exits on its last token."""
        return self._per_task(requests, functools.partial(super().loglikelihood_rolling, disable_tqdm=disable_tqdm),
                              "loglikelihood_rolling")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """`HFLM.generate_until`, task by task, with early exit at every generated token."""
        return self._per_task(requests, functools.partial(super().generate_until, disable_tqdm=disable_tqdm),
                              "generate_until")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # The rows `HFLM` will run: one per input, or one per distinct input with its logits cache (same rules).
        grouped = self.backend == "causal" and self.logits_cache
        by_key: dict[tuple[int, ...], tuple[int, ...]] = {}
        inputs: list[tuple[int, ...]] = []
        for _, context_enc, continuation_enc in requests:
            row = tuple((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            if grouped:
                by_key[tuple(context_enc + continuation_enc[:-1])] = row
            else:
                inputs.append(row)
        previous, self._row_lengths = self._row_lengths, _RowLengths(by_key.values() if grouped else inputs)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._row_lengths = previous

    # ------------------------------------------------------------------ model calls
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """The scoring forward: logits [batch, seq, vocab], each row from its exit layer.

        When the exit policy checks prompt forwards, the rows' real lengths (right padding) go to the model as an
        attention mask, so each row decides on its last real token; otherwise the call is `HFLM`'s.
        """
        if attn_mask is not None or labels is not None:
            raise ValueError(f"--model {MODEL_NAME} runs decoder-only models; got a seq2seq-style call.")
        lengths = self._row_lengths.resolve(inps) if self._row_lengths is not None else [None] * inps.shape[0]
        policy = self.model.exit_classifier
        checks = policy is not None and bool(policy.layers_to_check(self._num_layers))
        width = inps.shape[1]
        real = torch.tensor([width if n is None else n for n in lengths], dtype=torch.long)
        mask = None
        if checks and bool((real < width).any()):
            mask = (torch.arange(width).unsqueeze(0) < real.unsqueeze(1)).to(device=inps.device, dtype=torch.long)
        start = time.perf_counter()
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            out = self.model(input_ids=inps, attention_mask=mask, use_cache=False)
        _sync(self.device)
        seconds = time.perf_counter() - start
        known = torch.tensor([n is not None for n in lengths])
        if self._task is not None and bool(known.any()):  # (rows that are no request: the batch-size probe)
            if checks and not bool(known.all()):
                warnings.warn(f"{int((~known).sum())} scoring row(s) matched no request; they decide on their last "
                              "position.", RuntimeWarning, stacklevel=2)
            self._task.add(out.exit_layers[known], real[known], real[known], self._hidden_size, self._vocab)
            self._task.seconds += seconds * float(known.float().mean())
            self._task.model_calls += 1
        return out.logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """`HFLM._model_generate` with early exit at every token (the `exit_cache` option); returns the tokens."""
        generation_kwargs.setdefault("exit_cache", self.exit_cache)
        start = time.perf_counter()
        out = super()._model_generate(context, max_length, stop, return_dict_in_generate=True, **generation_kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        if self._task is not None:
            mask = generation_kwargs.get("attention_mask")
            prompt = (mask.sum(-1) if mask is not None else torch.full((context.shape[0],), context.shape[1]))
            exits = out.exit_layers  # [rows (x beams), steps]
            prompt = prompt.cpu().long().repeat_interleave(exits.shape[0] // context.shape[0])
            steps = torch.arange(exits.shape[1]).unsqueeze(0)
            seq = prompt.unsqueeze(1) + steps  # context length of each step
            positions = torch.where(steps == 0, prompt.unsqueeze(1), torch.ones_like(seq))
            self._task.add(exits, positions, seq, self._hidden_size, self._vocab)
            self._task.seconds += seconds
            self._task.model_calls += 1
        return out.sequences


def _register() -> None:
    """Registers [`AdaInferLM`] as `adainfer` in the harness's model registry (lazily; once).

    (The harness's own models are registered by then: importing `lm_eval.models.huggingface` imports
    `lm_eval.models`, which fills the registry; `get_model` only does so itself while the registry is empty.)
    """
    target = f"{_MODULE}:AdaInferLM"
    existing = dict(model_registry.items()).get(MODEL_NAME)
    if existing is None:
        model_registry.register(MODEL_NAME, target=target)
    elif existing != target and f"{getattr(existing, '__module__', '')}:{getattr(existing, '__name__', '')}" != target:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already registered to {existing!r}, not {target!r}.")


_register()


# ---------------------------------------------------------------------------------------------------- reporting
def exit_stats_table(stats: dict) -> str:
    """A Markdown table of [`AdaInferLM.exit_statistics`]'s output (one line per task, then all tasks).

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


@contextlib.contextmanager
def _collecting_stats() -> Iterator[list[dict]]:
    """Collects the statistics every `AdaInferLM` reports (from `get_model_info`) while the block runs."""
    collected: list[dict] = []
    _STATS_LISTENERS.append(collected.append)
    try:
        yield collected
    finally:
        _STATS_LISTENERS.remove(collected.append)


def _output_path(argv: Sequence[str]) -> Path | None:
    """The harness's `--output_path` / `-o` in `argv` (only peeked at: argv goes to the harness unchanged)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", "-o", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return Path(known.output_path) if known.output_path else None


def _results_files(output_path: Path | None) -> set[Path]:
    """The harness's aggregated-results files under `output_path` (see `EvaluationTracker`)."""
    if output_path is None:
        return set()
    if output_path.suffix == ".json":
        return set(output_path.parent.glob(f"{output_path.stem}_*.json"))
    return set(output_path.glob("*/results_*.json")) if output_path.is_dir() else set()


def _write_sidecars(output_path: Path, new_results: set[Path], stats: dict) -> list[Path]:
    written = []
    for results_file in sorted(new_results) or [None]:
        if results_file is None:  # the harness wrote nothing we recognise: next to where it would have
            folder = output_path.parent if output_path.suffix == ".json" else output_path
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{SIDECAR_PREFIX}.json"
        else:
            date = results_file.stem.rsplit("_", 1)[-1]
            path = results_file.with_name(f"{SIDECAR_PREFIX}_{date}.json")
        payload = {**stats, "results_file": None if results_file is None else results_file.name}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the harness's own CLI with `--model adainfer` available, then reports the exit statistics.

    `argv` (default `sys.argv[1:]`) goes unchanged to `lm_eval.__main__.cli_evaluate`, i.e. exactly what
    `lm_eval ARGS` would do, after this module registered `adainfer`. Afterwards the exit statistics of each
    `adainfer` model are printed as a table after the harness's and, with `--output_path`, written as
    `adainfer_exit_stats_<date>.json` beside the harness's `results_<date>.json`.

    Args:
        argv (`Sequence[str]`, *optional*): the harness's arguments, e.g. `["--model", "adainfer", ...]`.

    Returns:
        `int`: 0 (the harness raises or exits on errors).
    """
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    output_path = _output_path(argv)
    before = _results_files(output_path)
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # the harness's CLI parses sys.argv itself
    try:
        with _collecting_stats() as collected:
            cli_evaluate()
    finally:
        sys.argv = saved_argv
    for stats in collected:
        print()
        print(exit_stats_table(stats))
        if output_path is not None:
            for path in _write_sidecars(output_path, _results_files(output_path) - before, stats):
                print(f"Exit statistics written to {path}")
    return 0


if __name__ == "__main__":
    # Run the imported module's `main`, not this `__main__` copy's: the harness loads `AdaInferLM` by module name.
    import importlib

    sys.exit(importlib.import_module(_MODULE).main())
