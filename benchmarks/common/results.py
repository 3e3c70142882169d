"""How every benchmark writes its result: the package's one stamping writer behind three shared options.

`--out-root DIR` (default `docs/results`), `--variant NAME` (`<date>-NAME.json`, for a run that must not replace
another of the same day) and `--no-write` (print only). A result lands at `<root>/<model>/<question>/<date>.json`
(`models/` for one covering several models) through `adainfer_hf.utils.results.write_result`, which stamps it with
the commit, versions, device, date and the scrubbed command line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from adainfer_hf.utils.results import RESULTS_ROOT, scrub_path, write_result

__all__ = ["MODELS", "add_result_arguments", "classifier_configs", "command_line", "save_result", "settings_of"]

MODELS = "models"
"""The model directory of a result that covers several models."""


def add_result_arguments(parser, variant: str | None = None) -> None:
    """Adds `--out-root`, `--variant` (default `variant`) and `--no-write` to an argparse parser."""
    parser.add_argument("--out-root", default=str(RESULTS_ROOT),
                        help="results root; the file is <root>/<model>/<question>/<date>[-variant].json")
    parser.add_argument("--variant", default=variant,
                        help="a name appended to the date in the file name (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print the results only; write no file")


def command_line(argv) -> list[str]:
    """The command line to stamp: the program, then `argv` when `main` was called with one, else `sys.argv`'s."""
    return [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]


def classifier_configs(specs, classifiers) -> dict:
    """`{spec: config}` for `NAME=DIR` (or `DIR`) arguments and the classifiers loaded from them, as
    `write_result(classifiers=...)` takes it: the stamp records each config and its name instead of the path."""
    out = {}
    for spec, clf in zip(specs, classifiers, strict=True):
        name, sep, _ = spec.partition("=")
        out[spec] = {"name": name if sep else None, **dataclasses.asdict(clf.config)}
    return out


def _scrubbed(value):
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value
    name, sep, path = value.partition("=")
    if sep and os.path.isabs(path):  # NAME=DIR
        return f"{name}={scrub_path(path)}"
    return scrub_path(value) if os.path.isabs(value) else value


def settings_of(args) -> dict:
    """The parsed options a payload records: without the result options, every machine path scrubbed (also in
    `NAME=DIR` values) as the stamp's command line is."""
    return {k: _scrubbed(v) for k, v in vars(args).items() if k not in ("out_root", "variant", "no_write")}


def save_result(args, model: str, question: str, payload, argv, *, classifiers=None, variant=None) -> Path | None:
    """Writes `payload` with `write_result` under `args.out_root` (None with `--no-write`) and says where.

    `variant` (e.g. a setting the run was made with) is joined to `args.variant` when both are given."""
    if getattr(args, "no_write", False):
        return None
    parts = [v for v in (variant, getattr(args, "variant", None)) if v]
    path = write_result(model, question, payload, command_line(argv), classifiers=classifiers,
                        root=getattr(args, "out_root", RESULTS_ROOT), variant="-".join(parts) or None)
    print(f"wrote {path}")
    return path
