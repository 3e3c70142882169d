"""Paper-style evaluation: the evaluated methods and baselines, ShortGPT, generalization studies, tables and plots.

`adainfer_hf.evaluate` runs it all in one call; the pieces are importable from here:

```python
from adainfer_hf.evaluation import evaluate_prompts, generalization_study, markdown_table, prepare_baselines
```
"""

from .baselines import EVAL_METHODS, METHOD_LABELS, SWEEP_TARGETS, Baselines, LiveCRFPolicy, prepare_baselines
from .evaluate import evaluate, evaluate_prompts, flops_ratio
from .plots import plot_accuracy_vs_flops, plot_exit_histograms, plot_features, plot_layer_curves
from .report import RESULT_KEYS, finalize_results, markdown_table, merge_shards, study_table, write_report
from .shortgpt import block_influence, prune_layers, shortgpt_layers_to_remove, shortgpt_model
from .study import STUDY_MODES, generalization_study, transfer_classifier

__all__ = [
    "EVAL_METHODS",
    "METHOD_LABELS",
    "RESULT_KEYS",
    "STUDY_MODES",
    "SWEEP_TARGETS",
    "Baselines",
    "LiveCRFPolicy",
    "block_influence",
    "evaluate",
    "evaluate_prompts",
    "finalize_results",
    "flops_ratio",
    "generalization_study",
    "markdown_table",
    "merge_shards",
    "plot_accuracy_vs_flops",
    "plot_exit_histograms",
    "plot_features",
    "plot_layer_curves",
    "prepare_baselines",
    "prune_layers",
    "shortgpt_layers_to_remove",
    "shortgpt_model",
    "study_table",
    "transfer_classifier",
    "write_report",
]
