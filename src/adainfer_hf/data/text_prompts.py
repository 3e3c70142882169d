"""Plain-text prompts: a file of one prompt per line or of JSONL `{"text": ...}` records, and the small prompt set
shipped for training drafting classifiers (`drafting_prompts.jsonl`: prose, code, questions, chat and lists)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .prompts import Prompt

__all__ = ["DRAFTING_PROMPTS_FILE", "default_drafting_prompts", "load_text_prompts"]

DRAFTING_PROMPTS_FILE = Path(__file__).resolve().parent / "drafting_prompts.jsonl"
"""The shipped default prompt set of `adainfer train --lossless` (written for this package)."""


def load_text_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a text file: JSONL (every non-blank line a JSON object with a non-empty string `"text"`, and
    optionally `"kind"`, used as the prompt's task) when its first non-blank line starts with `{`, else one prompt
    per non-blank line (`\\n` inside a line stays as written).

    Returns:
        `list[data.Prompt]`: `task` is the record's `kind` (or `"text"`), `index` the line number (1-based),
        `answer` empty and `shots` 0.

    Raises:
        `ValueError`: naming the file and the line number of a bad line, or a file with no prompt.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompts from {path}: {err}") from err
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"{path} holds no prompt (expected one prompt per line, or JSONL {{\"text\": ...}}).")
    jsonl = numbered[0][1].lstrip().startswith("{")
    return [_jsonl_prompt(path, n, line) if jsonl else Prompt(text=line, answer="", task="text", shots=0, index=n)
            for n, line in numbered]


def _jsonl_prompt(path: Path, number: int, line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number}: not a JSON object ({err.msg}); the file is read as JSONL because "
                         "its first line starts with '{'.") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {number}: expected a JSON object with a \"text\" string; got "
                         f"{type(record).__name__}.")
    text, kind = record.get("text"), record.get("kind", "text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path} line {number}: \"text\" must be a non-empty string; got {text!r:.60}.")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{path} line {number}: \"kind\" must be a non-empty string; got {kind!r:.60}.")
    return Prompt(text=text, answer="", task=kind, shots=0, index=number)


def default_drafting_prompts() -> list[Prompt]:
    """The shipped prompt set ([`DRAFTING_PROMPTS_FILE`]): short prose, code, Q&A, chat and list prompts."""
    return load_text_prompts(DRAFTING_PROMPTS_FILE)
