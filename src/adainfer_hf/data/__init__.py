"""Prompts for training and evaluation: task files (`task_files`), built-in synthetic tasks (`builtin_tasks`), and
k-shot prompt building with disjoint splits and gold first tokens (`prompts`)."""
