"""The prompts the benchmarks share: the evaluated function-vectors tasks and the chat questions, held out from
every training run, and the chat template around a question."""

from __future__ import annotations

import os
from pathlib import Path

from adainfer_hf.data.prompts import build_prompts, load_task

__all__ = ["EVAL_TASKS", "FREE_TEXT", "FV", "chat", "held_out_texts"]

# the function-vectors task files: ../shared beside the repository, or $FV
FV = Path(os.environ.get("FV", Path(__file__).resolve().parents[3] / "shared" / "data" / "function_vectors"))
EVAL_TASKS = ("abstractive/sentiment", "abstractive/antonym", "abstractive/country-capital", "abstractive/capitalize")
FREE_TEXT = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is photosynthesis?",
    "Give three tips for learning a new language.", "What causes the seasons on Earth?",
    "How does a bicycle stay upright?", "Summarize the story of Little Red Riding Hood.",
    "What is the difference between weather and climate?",
]


def chat(tok, text: str) -> str:
    """`text` as a user turn in the chat template of `tok` (unchanged when it has none)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def held_out_texts(tok, shots: int, per_task: int, chats: int) -> tuple[list[str], list[str]]:
    """The evaluation prompts: `per_task` `shots`-shot prompts of each evaluated task, and `chats` chat questions."""
    tasks = [load_task(FV / f"{t}.json") for t in EVAL_TASKS]
    prompts = [q.text for t in tasks for q in build_prompts(t, shots, limit=per_task, seed=0)]
    return prompts, [chat(tok, t) for t in FREE_TEXT[:chats]]
