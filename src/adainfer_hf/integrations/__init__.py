"""Integrations of adainfer-hf with third-party tools.

Each subpackage imports its tool, so nothing here is imported eagerly: `import adainfer_hf` never needs them.

- `lm_eval`: lm-evaluation-harness (`lm-eval` 0.4.x, `pip install 'adainfer-hf[eval]'`) model type `adainfer`,
  with per-task exit statistics (`adainfer lm-eval ...`).
"""
