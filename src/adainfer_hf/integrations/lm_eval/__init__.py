"""lm-evaluation-harness (`lm-eval` 0.4.x) with early exit: the model type `adainfer`.

[`AdaInferLM`] (`model.py`) subclasses the harness's own `HFLM` (`--model hf`), so batching, `loglikelihood`,
`loglikelihood_rolling`, `generate_until`, chat templates and every `HFLM` model argument behave as with
`--model hf`; only the model is an AdaInfer class (`AutoAdaInferForCausalLM`: llama, opt, qwen2, qwen3, mistral,
gemma3_text) and every forward may exit early. `stats.py` holds the per-task exit statistics, `cli.py` the
command line.

```bash
pip install 'adainfer-hf[eval]'
adainfer lm-eval --model adainfer --tasks TASKS --output_path out/ \\
    --model_args pretrained=DIR_OR_ID,exit_classifier=DIR_OR_ID,exit_cache=propagate,dtype=float16
python -m adainfer_hf.integrations.lm_eval ...     # the same entry point, `main(argv)`
```

```python
>>> import lm_eval
>>> from adainfer_hf.integrations.lm_eval import AdaInferLM
>>> lm = AdaInferLM(pretrained=adainfer_model, tokenizer=tokenizer, batch_size=8)   # an already-loaded model
>>> results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"])
>>> results["config"]["adainfer_exit_stats"]["tasks"]["my_task"]["mean_exit_layer"]
```

**Discovery.** lm-eval 0.4.13 looks model names up in `lm_eval.api.registry.model_registry`, which it fills from
its own `lm_eval.models.MODEL_MAPPING`; it reads no entry points and has no plugin option, so a plain
`lm_eval --model adainfer` cannot find an external model. Importing this package registers `adainfer` (lazily,
with the registry's `"module:Class"` placeholder); [`main`] hands its arguments unchanged to the harness's own CLI
(`lm_eval.__main__.cli_evaluate`), then writes the exit statistics. In Python, import this package before
`lm_eval.simple_evaluate(model="adainfer", ...)`.

**Model arguments** (`--model_args`), besides everything `HFLM` takes (`dtype`, `batch_size`, `max_length`,
`parallelize`/`device_map`, `peft`, ...): `pretrained` (a directory or Hub id of a stock checkpoint of a supported
family, or an already-loaded AdaInfer model); `exit_classifier` (a directory or Hub id of an `ExitClassifier`,
`none` (never exit), or `auto`, the default: the artifact saved beside the checkpoint, when there is one; with a
loaded model, its current classifier), with `trust_remote_classifier` and `ignore_classifier_mismatch` as in
`from_pretrained`; `exit_layer=k` (every row exits after layer k: the stock model cut to k layers); `exit_cache`
(`propagate` (default) or `exact`: `generate`'s KV-cache option; scoring forwards run without a cache). `device`
defaults to `cuda` when available, else `cpu`. As with `--model hf`, `device_map` only takes effect together with
`parallelize=True`.

**What loglikelihood scoring means under early exit.** The harness scores a continuation from the logits at every
continuation position of one forward row (context + continuation, minus the last token). The model decides once per
row, on the row's last real token, and a row that exits after layer k returns, at every position, the logit lens
at k (final norm and LM head on the layer-k hidden states). So a request's log-likelihood is that of the model cut
to its row's exit layer. Consequences:

- One-token choices of a multiple-choice question share one row (`HFLM`'s logits cache): they are scored at the
  same depth. Choices of several tokens are rows of their own, each decided on its own last token, so the choices of
  one question may be scored at different depths.
- `HFLM` right-pads scoring batches and calls the model without an attention mask (harmless for a causal model,
  but the exit would be decided on a pad token). [`AdaInferLM`] recovers each row's real length from the requests of
  the current call and passes the mask whenever the exit policy checks prompt forwards; otherwise the call is
  exactly `--model hf`'s.
- `loglikelihood_rolling` windows are rows like any other; `generate_until` exits at every generated token, the
  prompt step included, with the `exit_cache` option.

**Exit statistics.** Requests are evaluated task by task (each harness call is split by `Instance.task_name`;
batches never mix tasks, the only difference from `--model hf`'s batching). Per task and over all tasks: requests,
exit decisions (one per forward row, and per row and generated token in `generate_until`), the mean exit layer, the
pruning ratio `1 - mean / L`, the exit-layer histogram, the paper's FLOPs ratio (`evaluation.flops_ratio` per
decision, aggregated as `sum n (2 l'(6h + s) + V) / sum n (2 L (6h + s) + V)`, `n` the positions a forward computed,
`s` the context length; without the exit checks' LM heads, as in the paper) and the wall-clock seconds of the model
calls. They land in `results["config"]["adainfer_exit_stats"]` (hence in the harness's results JSON); [`main`] also
writes them to a sidecar `adainfer_exit_stats_<date>.json` beside `results_<date>.json` and prints a table after
the harness's. Under `accelerate launch` data parallelism each process counts its own requests, the counts are
gathered from every process after each request type, and the table and the sidecar (written by the main process
only) report the whole run; `model_seconds` is then summed over the processes.
"""

from __future__ import annotations

from lm_eval.api.registry import model_registry

from .cli import main
from .model import MODEL_NAME, AdaInferLM, HarnessAutoModel
from .stats import SIDECAR_PREFIX, STATS_KEY, ExitTally, exit_stats_table

__all__ = [
    "MODEL_NAME",
    "SIDECAR_PREFIX",
    "STATS_KEY",
    "AdaInferLM",
    "ExitTally",
    "HarnessAutoModel",
    "exit_stats_table",
    "main",
    "register",
]

_TARGET = f"{AdaInferLM.__module__}:{AdaInferLM.__name__}"


def register() -> None:
    """Registers [`AdaInferLM`] as `adainfer` in the harness's model registry (lazily; idempotent).

    (The harness's own models are registered by then: importing `lm_eval.models.huggingface` imports
    `lm_eval.models`, which fills the registry; `get_model` only does so itself while the registry is empty.)
    """
    existing = dict(model_registry.items()).get(MODEL_NAME)
    if existing is None:
        model_registry.register(MODEL_NAME, target=_TARGET)
    elif existing is not AdaInferLM and existing != _TARGET:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already registered to {existing!r}, not {_TARGET!r}.")


register()
