"""Integrations of adainfer-hf with third-party tools.

Each submodule imports its tool, so nothing here is imported eagerly: `import adainfer_hf` never needs them.

- `lm_eval_harness`: lm-evaluation-harness (`lm-eval` 0.4.x) model type `adainfer`, with per-task exit statistics.
"""
