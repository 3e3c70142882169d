"""What the `adainfer` commands share about user input: argument types that name a bad value, the `--model` check,
`UsageError`, and the error boundary of `main` (one `error: ...` line and exit status 2; tracebacks with `--debug`).
"""

from __future__ import annotations

import argparse
import os
import sys

from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = [
    "USER_ERRORS",
    "UsageError",
    "add_debug_flag",
    "check_model_arg",
    "fraction",
    "int_at_least",
    "layers_or",
    "run_command",
]


class UsageError(Exception):
    """A mistake in the command line (a missing flag, a value that names nothing); `main` prints it as one line."""


# What a command raises because of what the user asked for (a bad value, a missing or unreadable file, an
# unsupported checkpoint): printed as one line with exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, ValueError, OSError, NotImplementedError)


def int_at_least(low: int):
    """An argparse `type`: an int >= `low`; a bad value fails with a message that quotes it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def fraction(closed_high: bool = True):
    """An argparse `type`: a number in (0, 1] (or (0, 1) with `closed_high=False`), quoting a bad value."""
    interval = "(0, 1]" if closed_high else "(0, 1)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not (0.0 < value < 1.0 or (closed_high and value == 1.0)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in {interval}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def layers_or(*words: str):
    """An argparse `type`: a number of decoder layers >= 0 (a float) or one of `words` (`"none"` gives None),
    quoting a bad value."""
    expected = "a number of layers >= 0 or " + " or ".join(repr(w) for w in words)

    def parse(text: str):
        if text in words:
            return None if text == "none" else text
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not 0.0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value

    parse.__name__ = expected
    return parse


def _is_hub_id(value: str) -> bool:
    if value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_model_arg(value: str, flag: str = "--model") -> str:
    """`value` when it is `"default"`, an existing directory or a plausible Hub id (`org/name`); else `UsageError`.

    Without this check a mistyped path reaches transformers, which answers "Repo id must be in the form ...".
    """
    if value == "default" or os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise UsageError(f"{flag} {value!r} is a file; expected a checkpoint directory, a Hub id 'org/name' or "
                         "'default'.")
    if not _is_hub_id(value):
        raise UsageError(f"{flag} {value!r}: no such directory, and not a Hub id of the form 'org/name' (expected a "
                         "checkpoint directory, a Hub id or 'default').")
    return value


def add_debug_flag(parser: argparse.ArgumentParser, top_level: bool = True) -> None:
    """Adds `--debug`; on a subcommand's parser it may also follow the subcommand (`adainfer train --debug`)."""
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="Show the full traceback of an error instead of one 'error:' line.")


def run_command(args: argparse.Namespace, call) -> int:
    """Runs `call()` (a command) and turns the user's errors into one `error: ...` line on stderr and status 2.

    With `args.debug` the exception propagates with its traceback; Ctrl-C gives status 130.
    """
    try:
        return call()
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the exception holds
        print(f"error: {message}", file=sys.stderr)
        return 2
