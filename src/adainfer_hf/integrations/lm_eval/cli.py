"""`main(argv)`: the harness's own CLI with `--model adainfer` registered, then the exit statistics."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lm_eval.__main__ import cli_evaluate

from .stats import collecting_stats, exit_stats_table, output_path, results_files, write_sidecars

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the harness's own CLI with `--model adainfer` available, then reports the exit statistics.

    `argv` (default `sys.argv[1:]`) goes unchanged to `lm_eval.__main__.cli_evaluate`, i.e. exactly what
    `lm_eval ARGS` would do, once `adainfer` is registered (importing this package does it). Afterwards the exit
    statistics of each `adainfer` model are printed as a table after the harness's and, with `--output_path`,
    written as `adainfer_exit_stats_<date>.json` beside the harness's `results_<date>.json`.

    Args:
        argv (`Sequence[str]`, *optional*): the harness's arguments, e.g. `["--model", "adainfer", ...]`.

    Returns:
        `int`: 0 (the harness raises or exits on errors).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out = output_path(argv)
    before = results_files(out)
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # the harness's CLI parses sys.argv itself
    try:
        with collecting_stats() as collected:
            cli_evaluate()
    finally:
        sys.argv = saved_argv
    for stats in collected:
        print()
        print(exit_stats_table(stats))
        if out is not None:
            for path in write_sidecars(out, results_files(out) - before, stats):
                print(f"Exit statistics written to {path}")
    return 0
