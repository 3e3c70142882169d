"""Small synthetic in-context tasks that ship with the package (no data download).

They drive the `adainfer demo` command and train the default classifier shipped for SmolLM2. Each generator is
deterministic given `(n, seed)` and returns a [`~adainfer_hf.data.Task`], so the tasks go through the same
prompt builder (`data.build_prompts`) as the function-vectors task files.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np

from .prompts import Example, Task

__all__ = ["BUILTIN_TASKS", "WORDS", "builtin_task", "builtin_task_names"]

# Common, short, lower-case English words: one or two tokens in most vocabularies.
WORDS = tuple(
    """
apple table river chair house water music paper green light night money horse dream smile bread cloud stone
heart plant train sugar beach earth field glass grape honey juice knife lemon mouse ocean piano queen radio
sheep tiger watch zebra bottle candle garden island jacket kitten ladder market orange pencil rabbit silver
summer winter window yellow basket button carpet circle doctor dragon finger flower forest hammer letter mirror
monkey number parrot pepper pillow planet pocket rocket saddle shadow singer spider spring thread ticket tomato
turtle valley wallet butter castle cookie dinner engine farmer guitar helmet jungle lizard muffin napkin
""".split()
)

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()


def _rng(seed: int, salt: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    return np.random.default_rng([int(seed), salt])


def _sample(pool, n: int, rng: np.random.Generator) -> list:
    """`n` items of `pool`: a permutation, repeated (reshuffled) when `n` exceeds the pool."""
    out = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def _capitalize(n, seed):
    return [Example(w, w.capitalize()) for w in _sample(WORDS, n, _rng(seed, 1))]


def _next_number(n, seed):
    return [Example(str(k), str(k + 1)) for k in _sample(list(range(1, 99)), n, _rng(seed, 2))]


def _next_letter(n, seed):
    letters = string.ascii_lowercase
    return [Example(c, letters[letters.index(c) + 1]) for c in _sample(letters[:-1], n, _rng(seed, 3))]


def _previous_letter(n, seed):
    letters = string.ascii_lowercase
    return [Example(c, letters[letters.index(c) - 1]) for c in _sample(letters[1:], n, _rng(seed, 4))]


def _number_word(n, seed):
    return [Example(str(k), _NUMBER_WORDS[k]) for k in _sample(list(range(1, 21)), n, _rng(seed, 5))]


def _lists(n, seed, salt, pick):
    rng = _rng(seed, salt)
    out = []
    for _ in range(n):
        items = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(3, 6)), replace=False)]
        out.append(Example(", ".join(items), pick(items)))
    return out


def _first_of_list(n, seed):
    return _lists(n, seed, 6, lambda items: items[0])


def _last_of_list(n, seed):
    return _lists(n, seed, 7, lambda items: items[-1])


BUILTIN_TASKS: dict[str, tuple[Callable[[int, int], list[Example]], str]] = {
    "capitalize": (_capitalize, "word -> Word"),
    "next_number": (_next_number, "17 -> 18"),
    "next_letter": (_next_letter, "c -> d"),
    "previous_letter": (_previous_letter, "d -> c"),
    "number_word": (_number_word, "7 -> seven"),
    "first_of_list": (_first_of_list, "apple, river, chair -> apple"),
    "last_of_list": (_last_of_list, "apple, river, chair -> chair"),
}
"""name -> (generator(n, seed) returning examples, one-line description)."""


def builtin_task_names() -> list[str]:
    """Names accepted by [`builtin_task`], sorted."""
    return sorted(BUILTIN_TASKS)


def builtin_task(name: str, n: int = 100, seed: int = 0) -> Task:
    """Generates one built-in task.

    Args:
        name (`str`): one of [`builtin_task_names`] (e.g. `"capitalize"`, `"next_number"`, `"first_of_list"`).
        n (`int`, *optional*, defaults to 100): number of examples. Tasks over a small domain (letters, numbers up
            to twenty) repeat inputs; `data.split_task` keeps repeated inputs on one side of its split.
        seed (`int`, *optional*, defaults to 0): seed of the example draw.

    Returns:
        `data.Task` named `name`, with `source="builtin:<name>"`.
    """
    if name not in BUILTIN_TASKS:
        raise ValueError(f"Unknown built-in task {name!r}; expected one of {builtin_task_names()}.")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n must be an int >= 2; got {n!r}.")
    return Task(name=name, examples=BUILTIN_TASKS[name][0](int(n), seed), source=f"builtin:{name}")
