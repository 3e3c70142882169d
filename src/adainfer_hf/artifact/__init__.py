"""The exit-classifier artifact on disk: its config (`config`), file names (`constants`, the one module to import
them from), the pickle-free estimator encoding (`codec`), load-time validation (`validation`), the manifest
(`manifest`), reading and writing (`io`), and `save_pretrained` / `from_pretrained` / `push_to_hub` (`hub`)."""

from .config import ExitClassifierConfig

__all__ = ["ExitClassifierConfig"]
