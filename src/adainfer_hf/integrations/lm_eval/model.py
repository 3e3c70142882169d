"""`AdaInferLM`: the harness's `HFLM` (`--model hf`) around an AdaInfer early-exit model (`--model adainfer`)."""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig

from ...cache.exact import CACHE_MODES
from ...models.auto import ADAINFER_CLASSES, AutoAdaInferForCausalLM
from ...policy.base import ExitPolicy, ScriptedExit
from ...policy.classifier import ExitClassifier
from .stats import FLOPS_FORMULA, STATS_KEY, ExitTally, gather_tallies, report_stats

__all__ = ["MODEL_NAME", "AdaInferLM", "HarnessAutoModel"]

MODEL_NAME = "adainfer"
"""The harness model type (`--model adainfer`)."""

_AUTO = "auto"
_UNNAMED_TASK = "<unnamed>"
_CONFIG_KWARGS = ("revision", "subfolder", "trust_remote_code", "cache_dir", "token", "local_files_only",
                  "gguf_file")


class HarnessAutoModel:
    """`HFLM.AUTO_MODEL_CLASS`: `AutoAdaInferForCausalLM`, with the config read from every loading option
    `HFLM` passes (`subfolder`, `gguf_file`, ...), so `HFLM`'s own loading code runs unchanged."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """`AutoAdaInferForCausalLM.from_pretrained` (any supported family, see `ADAINFER_CLASSES`)."""
        if kwargs.get("config") is None:
            kwargs["config"] = AutoConfig.from_pretrained(
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in _CONFIG_KWARGS if kwargs.get(k) is not None})
        return AutoAdaInferForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _is_adainfer_model(model: Any) -> bool:
    return isinstance(model, tuple(ADAINFER_CLASSES.values()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    def _match(self, row: list[int]) -> int | None:
        total = len(row)
        trailing = 0
        while trailing < total and row[total - 1 - trailing] == 0:
            trailing += 1
        for length in self._lengths:
            if length > total:
                continue
            if length < total - trailing:
                break
            key = tuple(row[:length])
            if self._remaining[key] > 0:
                self._remaining[key] -= 1
                return length
        self.missed += 1
        return None

    def resolve(self, rows: torch.Tensor) -> list[int | None]:
        """Each row's real length, or None for a row that is no known input (e.g. `HFLM`'s batch-size probe)."""
        return [self._match(row) for row in rows.tolist()]


def _policy_argument(exit_classifier, exit_layer):
    """The policy that `exit_classifier` / `exit_layer` name (`"none"` -> None, `exit_layer` -> `ScriptedExit`)."""
    if isinstance(exit_classifier, str) and exit_classifier.lower() == "none":
        exit_classifier = None
    if exit_layer is None:
        return exit_classifier
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1:
        raise ValueError(f"exit_layer must be an int >= 1; got {exit_layer!r}.")
    if exit_classifier is not None and exit_classifier != _AUTO:
        raise ValueError(f"Pass exit_layer or exit_classifier, not both; got exit_layer={exit_layer!r} and "
                         f"exit_classifier={exit_classifier!r}.")
    return ScriptedExit(exit_layer)


class AdaInferLM(HFLM):
    """lm-evaluation-harness model `adainfer`: the harness's `HFLM` around an AdaInfer early-exit model.

    Args:
        pretrained (`str` or AdaInfer model):
            A local directory or Hub id of a stock checkpoint of a supported family (`ADAINFER_CLASSES`: llama,
            opt, qwen2, qwen3, mistral, gemma3_text), loaded with `AutoAdaInferForCausalLM`, or an already-loaded
            AdaInfer model.
        exit_classifier (`str`, `os.PathLike`, `ExitPolicy` or `None`, *optional*, defaults to `"auto"`):
            A directory or Hub id of an `ExitClassifier`, a policy instance, `None` / `"none"` (never exit), or
            `"auto"`: the artifact saved beside the checkpoint when there is one (with a loaded model: keep its
            current classifier).
        exit_layer (`int`, *optional*):
            Exit every row after this layer (`ScriptedExit`): the stock model cut to `exit_layer` layers. Not
            together with an explicit `exit_classifier`.
        exit_cache (`str`, *optional*, defaults to `"propagate"`):
            KV-cache option of `generate` (`"propagate"` or `"exact"`); scoring forwards run without a cache.
        trust_remote_classifier (`bool`, *optional*, defaults to `False`):
            Allow unpickling a joblib classifier downloaded from the Hub.
        ignore_classifier_mismatch (`bool`, *optional*, defaults to `False`):
            Warn instead of raising when the classifier was made for another model.
        kwargs:
            Everything `lm_eval.models.huggingface.HFLM` takes (`tokenizer`, `dtype`, `batch_size`, `device`,
            `max_length`, `parallelize`, `device_map`, ...). `device` defaults to `"cuda"` when available, else
            `"cpu"`.

    The exit statistics of everything evaluated since creation (or `reset_exit_statistics`) are
    `exit_statistics()`, and are added to the harness's results as `results["config"]["adainfer_exit_stats"]`.
    Under `accelerate launch` data parallelism they cover every process's requests (gathered after each request
    type, `stats.gather_tallies`).
    """

    AUTO_MODEL_CLASS = HarnessAutoModel

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
        exit_classifier = _policy_argument(exit_classifier, exit_layer)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        loaded = not isinstance(pretrained, (str, os.PathLike))
        if loaded and not _is_adainfer_model(pretrained):
            raise TypeError(
                f"--model {MODEL_NAME} needs pretrained= a checkpoint path/id or an AdaInfer model "
                f"({', '.join(c.__name__ for c in ADAINFER_CLASSES.values())}); got {type(pretrained).__name__}. "
                "Use --model hf for stock models.")
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
        shortlist = getattr(self.model.exit_classifier, "check_vocabulary", None)
        if shortlist is not None:
            warnings.warn(f"the exit policy's checks score a shortlist of {len(shortlist)} token ids "
                          "(check_vocabulary): where a request exits, every other token's log-likelihood is -inf, "
                          "so loglikelihood tasks score it as impossible; use a policy without a shortlist to "
                          "score them.", UserWarning, stacklevel=2)
        self.exit_cache = exit_cache
        self._num_layers = self.model.exit_stats.num_layers
        text_config = self.model.config.get_text_config()
        self._hidden_size = int(text_config.hidden_size)
        self._vocab = int(text_config.vocab_size)
        self._tallies: dict[str, ExitTally] = {}  # this process's requests
        self._run_tallies = self._tallies  # every process's (gathered after each request type under data parallelism)
        self._task: ExitTally | None = None  # the task whose requests run now (set by `_per_task`)
        self._row_lengths: _RowLengths | None = None  # set while `_loglikelihood_tokens` runs

    # ------------------------------------------------------------------ statistics
    def exit_statistics(self) -> dict:
        """Exit statistics per task and over all tasks, as plain JSON-ready Python.

        Returns:
            `dict`: `{"model", "num_layers", "exit_policy", "exit_cache", "flops_formula", "tasks": {task: {...}},
            "all": {...}}`; each entry has `requests`, `decisions`, `mean_exit_layer`, `pruning_ratio`,
            `flops_ratio`, `model_seconds`, `model_calls`, `exit_histogram` and `request_types`.
        """
        total = ExitTally(self._num_layers)
        for tally in self._run_tallies.values():
            total.merge(tally)
        return {
            "model": getattr(self.model.config, "_name_or_path", None) or None,
            "num_layers": self._num_layers,
            "exit_policy": repr(self.model.exit_classifier),
            "exit_cache": self.exit_cache,
            "flops_formula": FLOPS_FORMULA,
            "tasks": {name: tally.as_dict() for name, tally in sorted(self._run_tallies.items())},
            "all": total.as_dict(),
        }

    def reset_exit_statistics(self) -> None:
        """Forgets the statistics gathered so far."""
        self._tallies.clear()
        self._run_tallies = self._tallies

    def get_model_info(self) -> dict:
        """`HFLM.get_model_info` plus the exit statistics under `STATS_KEY` (the harness adds it to its results)."""
        info = super().get_model_info()
        info[STATS_KEY] = stats = self.exit_statistics()
        report_stats(stats)
        return info

    def _per_task(self, requests: list, run: Callable[[list], list], request_type: str) -> list:
        """Runs `requests` task by task (so every forward is attributed to one task), in their original order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(getattr(request, "task_name", None) or _UNNAMED_TASK, []).append(i)
        results: list = [None] * len(requests)
        for task, indices in groups.items():
            tally = self._tallies.setdefault(task, ExitTally(self._num_layers))
            tally.requests += len(indices)
            tally.request_types.add(request_type)
            previous, self._task = self._task, tally
            try:
                outputs = run([requests[i] for i in indices])
            finally:
                self._task = previous
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
        # Every process runs each request type once (the harness's data parallelism): the whole run's counts here,
        # since only the main process reports them (`get_model_info`), after the last collective.
        self._run_tallies = gather_tallies(self._tallies)
        return results

    # ------------------------------------------------------------------ the harness's request types
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`HFLM.loglikelihood`, task by task, with early exit in every scoring forward."""
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
