"""`--classifier NAME=DIR` arguments of the benchmarks: saved exit classifiers, bound to the model."""

from __future__ import annotations

from adainfer_hf import ExitClassifier

__all__ = ["named_classifiers"]


def named_classifiers(specs, model) -> dict:
    """`{NAME: ExitClassifier}` from `NAME=DIR` strings, each bound to `model`."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--classifier expects NAME=DIR; got {spec!r}.")
        out[name] = ExitClassifier.from_pretrained(path).bind(model)
    return out
