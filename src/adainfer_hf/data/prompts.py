"""Task loading and k-shot prompt building in the AdaInfer paper's format.

A *task* is a list of (input, output) pairs. The paper evaluates in-context learning with the template

```
Q: {input}
A: {output}

Q: {input}
A:
```

i.e. `shots` demonstrations followed by the query, and scores the model's next token after the final `A:`
against the first token of the gold output.

Demonstrations are always drawn from a pool that is disjoint from the evaluated examples (see [`split_task`]), so a
query never sees its own answer among its demonstrations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .task_files import Example, Task, load_task

__all__ = [
    "DEFAULT_DEMO_FRACTION",
    "DEMO_TEMPLATE",
    "PAPER_SHOTS",
    "QUERY_TEMPLATE",
    "Example",
    "Prompt",
    "Task",
    "build_prompts",
    "format_prompt",
    "gold_first_token",
    "load_task",
    "split_examples",
    "split_task",
]

DEMO_TEMPLATE = "Q: {input}\nA: {output}\n\n"
"""One demonstration. Demonstrations are concatenated, then followed by [`QUERY_TEMPLATE`]."""

QUERY_TEMPLATE = "Q: {input}\nA:"
"""The query; the model's next token is compared with the first token of the gold output."""

PAPER_SHOTS = (0, 5, 10, 15, 20)
"""The numbers of demonstrations the paper evaluates."""

DEFAULT_DEMO_FRACTION = 0.3
"""Share of a task's distinct inputs that goes to the demonstration pool; the rest is evaluated."""

T = TypeVar("T")


@dataclass
class Prompt:
    """
    A k-shot prompt for one evaluated example.

    Args:
        text (`str`):
            The full prompt, demonstrations then query, ending in `"A:"`.
        answer (`str`):
            The gold output of the query.
        task (`str`):
            Name of the task the query comes from.
        shots (`int`):
            Number of demonstrations in `text`.
        index (`int`):
            Position of the query in `task.examples`, stable across `shots`, `limit` and calls.
    """

    text: str
    answer: str
    task: str
    shots: int
    index: int


# --------------------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    """A non-negative integer, `bool` excluded."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _check_seed(seed: int) -> None:
    if not _is_count(seed):
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")


def _split_indices(task: Task, seed: int, demo_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the demonstration pool and of the (shuffled) evaluation pool."""
    _check_seed(seed)
    if not 0.0 < demo_fraction < 1.0:
        raise ValueError(f"`demo_fraction` must lie strictly between 0 and 1, got {demo_fraction!r}.")
    # Split over distinct inputs, not positions: several task files repeat an input (sometimes with another
    # output), and a query must not find its own input among its demonstrations.
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(task.examples):
        groups.setdefault(example.input, []).append(index)
    if len(groups) < 2:
        raise ValueError(
            f"Task '{task.name}' has {len(groups)} distinct input(s); at least 2 are needed to separate "
            "demonstrations from evaluated examples."
        )
    keys = list(groups)
    # A stream of its own (the [seed, 0] entropy) so the split does not depend on how demonstrations are drawn.
    order = np.random.default_rng([int(seed), 0]).permutation(len(keys))
    n_demo = min(max(round(demo_fraction * len(keys)), 1), len(keys) - 1)
    demo = sorted(i for k in order[:n_demo] for i in groups[keys[k]])
    evaluated = [i for k in order[n_demo:] for i in groups[keys[k]]]
    return demo, evaluated


def split_task(
    task: Task, seed: int = 0, demo_fraction: float = DEFAULT_DEMO_FRACTION
) -> tuple[list[Example], list[Example]]:
    """
    Split a task into a demonstration pool and an evaluation pool, deterministically.

    The split is over *distinct inputs*: all examples sharing an input land on the same side, so the pools are
    disjoint in content, not only in position. It depends only on `seed`, `demo_fraction` and the task, so every
    `shots` setting is evaluated on the same examples.

    Args:
        task ([`Task`]):
            The task to split.
        seed (`int`, *optional*, defaults to 0):
            Seed of the numpy `Generator` that shuffles the inputs.
        demo_fraction (`float`, *optional*, defaults to 0.3):
            Share of the distinct inputs given to the demonstration pool, in (0, 1). Each pool gets at least one.

    Returns:
        `tuple[list[Example], list[Example]]`: `(demo_pool, eval_pool)`; the demonstration pool in file order,
        the evaluation pool shuffled (so a prefix of it is a random sample).
    """
    demo, evaluated = _split_indices(task, seed, demo_fraction)
    return [task.examples[i] for i in demo], [task.examples[i] for i in evaluated]


def split_examples(examples: Sequence[T], fractions: Sequence[float], seed: int = 0) -> list[list[T]]:
    """
    Shuffle `examples` and cut them into consecutive parts of the given sizes, e.g. calibration / evaluation.

    Args:
        examples (`Sequence`):
            Anything indexable: examples, prompts, feature rows.
        fractions (`Sequence[float]`):
            Share of each part, each in (0, 1], summing to at most 1; a sum below 1 leaves the remainder out.
            Part sizes are rounded from the cumulative shares, so they always add up to `round(sum * len)`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the numpy `Generator` that shuffles.

    Returns:
        `list[list]`: one list per fraction, disjoint, each in shuffled order.
    """
    _check_seed(seed)
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"`fractions` must be shares in (0, 1] summing to at most 1, got {fractions!r}.")
    order = np.random.default_rng(int(seed)).permutation(len(examples))
    bounds = [0] + [min(round(b * len(examples)), len(examples)) for b in np.cumsum(fractions)]
    return [[examples[i] for i in order[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def format_prompt(demonstrations: Sequence[Example], query: str) -> str:
    """
    Render demonstrations and a query with the paper's template.

    Args:
        demonstrations (`Sequence[Example]`):
            Rendered in order as `"Q: {input}\\nA: {output}\\n\\n"`.
        query (`str`):
            The question, rendered as `"Q: {query}\\nA:"`.

    Returns:
        `str`: the prompt, ending in `"A:"` (no trailing space: the answer's leading space belongs to its first
        token in most tokenizers).
    """
    parts = [DEMO_TEMPLATE.format(input=d.input, output=d.output) for d in demonstrations]
    parts.append(QUERY_TEMPLATE.format(input=query))
    return "".join(parts)


def build_prompts(
    task: Task,
    shots: int,
    limit: int | None = None,
    seed: int = 0,
    demo_fraction: float = DEFAULT_DEMO_FRACTION,
) -> list[Prompt]:
    """
    Build `shots`-shot prompts for a task's evaluation pool.

    The evaluation pool comes from [`split_task`] with the same `seed` and `demo_fraction`. Each query draws its
    demonstrations from the demonstration pool with its own numpy `Generator` (seeded by `seed` and the query's
    index), as a prefix of one permutation of the pool: a query's prompt does not depend on `limit`, and its
    5-shot demonstrations are the first 5 of its 10-shot ones.

    Args:
        task ([`Task`]):
            The task.
        shots (`int`):
            Demonstrations per prompt, `>= 0` (the paper uses 0, 5, 10, 15, 20).
        limit (`int`, *optional*):
            Evaluate only the first `limit` examples of the (shuffled) evaluation pool; all when `None`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the split and of the demonstration draws.
        demo_fraction (`float`, *optional*, defaults to 0.3):
            Share of distinct inputs reserved for demonstrations, see [`split_task`].

    Returns:
        `list[Prompt]`: one prompt per evaluated example, in evaluation-pool order.
    """
    if not _is_count(shots):
        raise ValueError(f"`shots` must be an integer >= 0, got {shots!r}.")
    if limit is not None and not _is_count(limit):
        raise ValueError(f"`limit` must be None or an integer >= 0, got {limit!r}.")
    demo, evaluated = _split_indices(task, seed, demo_fraction)
    if shots > len(demo):
        raise ValueError(
            f"`shots={shots}` exceeds the {len(demo)} examples in the demonstration pool of task '{task.name}' "
            f"({len(task)} examples, demo_fraction={demo_fraction}); lower `shots` or raise `demo_fraction`."
        )
    if limit is not None:
        evaluated = evaluated[:limit]
    prompts = []
    for index in evaluated:
        rng = np.random.default_rng([int(seed), 1, index])
        chosen = rng.permutation(len(demo))[:shots]
        demonstrations = [task.examples[demo[j]] for j in chosen]
        query = task.examples[index]
        prompts.append(
            Prompt(
                text=format_prompt(demonstrations, query.input),
                answer=query.output,
                task=task.name,
                shots=int(shots),
                index=index,
            )
        )
    return prompts


# --------------------------------------------------------------------------------------------------------------
# Gold token
# --------------------------------------------------------------------------------------------------------------

_warned_boundary_merge = False


def _encode(tokenizer, text: str) -> list[int]:
    # No special tokens: a BOS would shift both encodings alike, and an appended EOS (some tokenizers add one)
    # would break the prefix comparison below.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def gold_first_token(tokenizer, prompt_text: str, answer: str) -> int:
    """
    The id of the gold answer's first token as the model would emit it right after the prompt.

    Tokenizing the answer on its own gives the wrong token in most tokenizers: after `"A:"` the answer is preceded
    by a space, which byte-level BPE (`"ĠParis"`) and SentencePiece (`"▁Paris"`) fold into the word's token. So
    the function tokenizes `prompt_text + " " + answer` and returns the first token past the prompt's own tokens.

    If the tokenizer merges across the boundary (the encoding of the whole text does not start with the encoding of
    the prompt, e.g. a vocabulary with a `": "` token), no single next token reproduces the gold text; the first
    token where the two encodings differ is returned and a warning is emitted once.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]):
            The model's tokenizer.
        prompt_text (`str`):
            The prompt, typically ending in `"A:"`.
        answer (`str`):
            The gold answer, without a leading space.

    Returns:
        `int`: the token id.
    """
    global _warned_boundary_merge
    if not answer.strip():
        raise ValueError(f"The gold answer {answer!r} is empty; it has no first token.")
    prompt_ids = _encode(tokenizer, prompt_text)
    full_ids = _encode(tokenizer, prompt_text + " " + answer)
    shared = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        shared += 1
    if shared < len(prompt_ids) and not _warned_boundary_merge:
        _warned_boundary_merge = True
        warnings.warn(
            f"The tokenizer merges the end of the prompt {prompt_text[-20:]!r} with the answer {answer!r}; using "
            "the first differing token as the gold token.",
            stacklevel=2,
        )
    if shared >= len(full_ids):  # cannot happen with a non-empty answer, but never index past the end
        raise ValueError(f"Appending the answer {answer!r} to the prompt added no token.")
    return int(full_ids[shared])
