"""JSON-safe copies of the calibration records a classifier carries (`ExitClassifier.calibration`)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["jsonable"]


def jsonable(value):
    """`value` with dict keys as strings, tuples as lists, numpy scalars as Python ones and non-finite floats as
    None (JSON has no inf or nan)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
