"""Small helpers with no knowledge of models or artifacts: statistics (`stats`), tokenizer settings
(`tokenizers`) and atomic file writes (`atomic`). The bottom layer of the package, beside
`compat`: it imports nothing else of ours."""

from .stats import binomial_tail, binomial_upper_bound
from .tokenizers import left_padding

__all__ = ["binomial_tail", "binomial_upper_bound", "left_padding"]
