"""`adainfer lm-eval ARGS`: lm-evaluation-harness with `--model adainfer` (the optional `eval` extra)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["INSTALL_HINT", "add_lm_eval_parser"]

INSTALL_HINT = "pip install 'adainfer-hf[eval]'"
_INTEGRATION = "adainfer_hf.integrations.lm_eval"


def _cmd_lm_eval(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        print(f"error: adainfer lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}",
              file=sys.stderr)
        return 2
    # The integration imports lm_eval at its top, so it is loaded by name, only when asked for (integrations/ is
    # below cli/ in the layer order: this is no cycle).
    return importlib.import_module(_INTEGRATION).main(args.harness_args)


def add_lm_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `lm-eval` subcommand to an `argparse` subparsers object; returns its parser.

    Everything after `lm-eval` goes unchanged to the harness's own CLI (`--help` included, which shows the
    harness's options): the subparser has no options of its own (its prefix character is `+`, so `--model` and
    `-o` are not taken for its options).
    """
    p = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="+",
        help="lm-evaluation-harness with --model adainfer, then per-task exit statistics (needs the 'eval' extra; "
             "`adainfer lm-eval --help` shows the harness's options).",
        description="Runs `lm_eval ARGS` with the model type `adainfer` registered, then prints the exit "
                    f"statistics and writes them beside the harness's results. Install: {INSTALL_HINT}.")
    p.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="lm_eval arguments, passed on unchanged (e.g. --model adainfer --model_args "
                        "pretrained=DIR,exit_classifier=DIR --tasks TASKS).")
    p.set_defaults(func=_cmd_lm_eval)
    return p
