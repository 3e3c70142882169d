"""Reading tasks: function-vectors JSON files, JSONL or CSV with named columns, and Hugging Face datasets.

A task is a named list of (input, output) examples; `data.build_prompts` turns it into k-shot prompts.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HF_PREFIX", "Example", "Task", "load_task"]

HF_PREFIX = "hf:"
_FILE_SUFFIXES = (".json", ".jsonl", ".csv")


@dataclass(frozen=True)
class Example:
    """
    One (input, output) pair of a task.

    Args:
        input (`str`):
            The question, placed after `Q: `.
        output (`str`):
            The gold answer, placed after `A: `.
    """

    input: str
    output: str


@dataclass
class Task:
    """
    A named list of examples.

    Args:
        name (`str`):
            Task name, used in prompts' metadata and reports (e.g. `"country-capital"`).
        examples (`list[Example]`):
            The task's examples, in file order.
        source (`str`, *optional*):
            Where the examples were loaded from (a file path or `hf:<dataset id>`).
    """

    name: str
    examples: list[Example]
    source: str | None = None

    def __len__(self) -> int:
        return len(self.examples)


def load_task(
    source: str | os.PathLike,
    input_column: str = "input",
    output_column: str = "output",
    split: str | None = None,
    name: str | None = None,
) -> Task:
    """
    Load a task from a file or a Hugging Face dataset.

    Supported sources:

    - a `.json` file holding a list of objects, the format of the function-vectors task files
      (`[{"input": "France", "output": "Paris"}, ...]`);
    - a `.jsonl` file with one such object per line (blank lines are skipped);
    - a `.csv` file with a header row naming the columns;
    - `"hf:<dataset id>"`, or any string that is not an existing path when `datasets` is installed:
      `datasets.load_dataset(<id>, split=split)`. Needs `pip install adainfer-hf[datasets]`.

    Values are converted with `str` and stripped of surrounding whitespace: the template supplies its own spaces and
    newlines, and some task files carry stray ones (e.g. a trailing `"\\n"` in outputs).

    Args:
        source (`str` or `os.PathLike`):
            A file path or a dataset id, as above.
        input_column (`str`, *optional*, defaults to `"input"`):
            Key or column holding the question.
        output_column (`str`, *optional*, defaults to `"output"`):
            Key or column holding the answer.
        split (`str`, *optional*):
            Dataset split; only for Hugging Face datasets, where it is required when the dataset has several.
        name (`str`, *optional*):
            Task name; defaults to the file stem or the dataset id.

    Returns:
        [`Task`]: the loaded task, with at least one example.

    Raises:
        `ValueError`: the file is empty, malformed, has an unknown extension or lacks a column.
        `FileNotFoundError`: `source` is neither an existing file nor a dataset id that can be loaded.
        `ImportError`: a dataset id was given and `datasets` is not installed.
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        dataset_id = source[len(HF_PREFIX) :]
        return _load_hf(dataset_id, input_column, output_column, split, name)

    path = Path(source)
    if not path.exists():
        looks_like_file = path.suffix.lower() in _FILE_SUFFIXES or not isinstance(source, str)
        if not looks_like_file and _datasets_available():
            return _load_hf(str(source), input_column, output_column, split, name)
        hint = "" if looks_like_file else f"; to load a Hugging Face dataset pass '{HF_PREFIX}{source}'"
        raise FileNotFoundError(f"Task file '{path}' does not exist{hint}.")
    if path.is_dir():
        raise ValueError(f"Task source '{path}' is a directory; expected a {', '.join(_FILE_SUFFIXES)} file.")
    if split is not None:
        raise ValueError(
            f"`split={split!r}` only applies to Hugging Face datasets, not to the file '{path}'."
        )

    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path, (input_column, output_column))
    else:
        raise ValueError(
            f"Task file '{path}' has the unknown extension {path.suffix!r}; expected one of {list(_FILE_SUFFIXES)}."
        )
    examples = _to_examples(rows, input_column, output_column, where=f"'{path}'")
    return Task(name=name or path.stem, examples=examples, source=str(path))


def _datasets_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


def _read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"Task file '{path}' is empty; expected examples with input and output fields.")
    return text


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"Task file '{path}' is not valid JSON: {error}.") from error
    if not isinstance(data, list):
        raise ValueError(
            f"Task file '{path}' holds a JSON {type(data).__name__}; expected a JSON list of objects such as "
            '[{"input": ..., "output": ...}, ...].'
        )
    return data


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"Task file '{path}', line {line_number}: not valid JSON ({error}).") from error
    return rows


def _read_csv(path: Path, columns: tuple[str, str]) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise ValueError(
                f"Task file '{path}' is empty; expected a CSV header naming the columns {list(columns)}."
            )
        missing = [column for column in columns if column not in header]
        if missing:
            raise ValueError(
                f"Task file '{path}' has no column(s) {missing}; its header is {header}. "
                "Pass `input_column=` / `output_column=` to name the right ones."
            )
        return list(reader)


def _to_examples(rows: Iterable[Any], input_column: str, output_column: str, where: str) -> list[Example]:
    examples = []
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"Task {where}, example {position}: got a {type(row).__name__}; expected an object with "
                f"'{input_column}' and '{output_column}' fields."
            )
        values = []
        for column in (input_column, output_column):
            if row.get(column) is None:
                raise ValueError(
                    f"Task {where}, example {position}: missing '{column}'; it has the fields {sorted(row)}. "
                    "Pass `input_column=` / `output_column=` to name the right ones."
                )
            values.append(str(row[column]).strip())
        examples.append(Example(input=values[0], output=values[1]))
    if not examples:
        raise ValueError(f"Task {where} contains no examples.")
    return examples


def _load_hf(
    dataset_id: str, input_column: str, output_column: str, split: str | None, name: str | None
) -> Task:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"Loading the Hugging Face dataset '{dataset_id}' needs the `datasets` package: "
            "`pip install adainfer-hf[datasets]`."
        ) from error
    loaded = datasets.load_dataset(dataset_id, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(
                f"Dataset '{dataset_id}' has the splits {sorted(loaded)}; pass `split=` to pick one."
            )
        loaded = next(iter(loaded.values()))
    missing = [column for column in (input_column, output_column) if column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"Dataset '{dataset_id}' has no column(s) {missing}; its columns are {loaded.column_names}. "
            "Pass `input_column=` / `output_column=` to name the right ones."
        )
    examples = _to_examples(loaded, input_column, output_column, where=f"'{HF_PREFIX}{dataset_id}'")
    return Task(name=name or dataset_id, examples=examples, source=f"{HF_PREFIX}{dataset_id}")
