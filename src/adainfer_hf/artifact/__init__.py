"""The exit-classifier artifact on disk: its config (`config`), file names (`constants`), the pickle-free estimator
encoding and the linear fast path (`codec`), reading and writing (`io`), and `save_pretrained` / `from_pretrained` /
`push_to_hub` (`hub`)."""

from .config import ExitClassifierConfig
from .constants import CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME, CLASSIFIER_WEIGHTS_NAME

__all__ = ["CLASSIFIER_CONFIG_NAME", "CLASSIFIER_SAFE_NAME", "CLASSIFIER_WEIGHTS_NAME", "ExitClassifierConfig"]
