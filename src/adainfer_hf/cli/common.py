"""What the `adainfer` subcommands share: model and task loading from flags, and the flags themselves.

Each flag that several subcommands accept is declared here once (`add_model_arg`, `add_task_args`, `add_run_args`,
`add_data_args`),
so `adainfer train` and `adainfer eval` spell and document them the same way.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from ..data.builtin_tasks import builtin_task, builtin_task_names
from ..data.prompts import build_prompts, load_task
from ..models.default_model import default_model_dir
from ..models.loading import load_adainfer_model
from .args import UsageError, check_model_arg, int_at_least

__all__ = [
    "add_data_args",
    "add_model_arg",
    "add_run_args",
    "add_task_args",
    "figures_line",
    "load_dense_model",
    "prompts_from",
    "tasks_from_args",
]


# ---------------------------------------------------------------------------------------------------- loading
def load_dense_model(model: str, flag: str = "--model"):
    """(model, tokenizer) of a checkpoint dir, Hub id or 'default', with no exit classifier.

    A `model` that is none of these raises `UsageError` naming `flag`."""
    check_model_arg(model, flag)
    if model == "default":
        model = str(default_model_dir())
    # exit_classifier=None: collection and training must see the dense model, whatever sits beside it.
    return load_adainfer_model(model, exit_classifier=None), AutoTokenizer.from_pretrained(model)


def tasks_from_args(args):
    """The tasks named by --task-file / --builtin-task."""
    tasks = [load_task(f) for f in args.task_file or []]
    names = args.builtin_task or []
    if "all" in names:
        names = builtin_task_names()
    tasks += [builtin_task(n, seed=args.seed) for n in names]
    if not tasks:
        raise UsageError("give at least one --task-file FILE or --builtin-task NAME (or 'all').")
    return tasks


def prompts_from(tasks, shots, limit, seed):
    """The prompts of every task and shots value (`data.build_prompts`), in that order."""
    return [p for task in tasks for k in shots for p in build_prompts(task, k, limit=limit, seed=seed)]


def figures_line(s: dict) -> str:
    """One line of agreement / layers / gold accuracy from a `summarize_exits` or calibration dict."""
    line = f"n={s['n']} agreement={s['agreement']:.3f} mean_layers={s['mean_exit_layer']:.2f}/{s['num_layers']}"
    if "gold_accuracy_exit" in s:  # tables without gold answers (generated tokens) have none
        line += f" gold_acc dense={s['gold_accuracy_dense']:.3f} exit={s['gold_accuracy_exit']:.3f}"
    return line


# ---------------------------------------------------------------------------------------------------- flags
# One flag per line or two reads better than the formatter's one keyword per line.
# fmt: off
def add_model_arg(p, default: str | None = None) -> None:
    """`--model`: a checkpoint directory, a Hub id or 'default' (required unless `default` is given)."""
    p.add_argument("--model", required=default is None, default=default,
                   help="Local directory or Hub id of a supported checkpoint, or 'default' for the embedded "
                   "SmolLM2-135M-Instruct" + (f" (default: {default})." if default else "."))


def add_task_args(p, limit: int) -> None:
    """`--task-file`, `--builtin-task`, `--shots` and `--limit` (default `limit`): which prompts to build."""
    p.add_argument("--task-file", action="extend", nargs="+", metavar="FILE",
                   help="Task file(s): function-vectors .json, .jsonl or .csv with input/output fields.")
    p.add_argument("--builtin-task", action="extend", nargs="+", metavar="NAME",
                   help="Built-in synthetic task(s) (see adainfer_hf.data.builtin_tasks), or 'all'.")
    p.add_argument("--shots", type=int_at_least(0), nargs="+", default=[0],
                   help="Demonstrations per prompt; several values build prompts for each (e.g. --shots 0 5).")
    p.add_argument("--limit", type=int_at_least(1), default=limit,
                   help=f"Evaluated examples per task and shots value (default {limit}).")


def add_data_args(p) -> None:
    """What `collect` and `train` read: the model and task flags, `--check-dtype` and the run flags."""
    add_model_arg(p)
    add_task_args(p, limit=50)
    p.add_argument("--check-dtype", default=None, choices=["bfloat16", "float16"],
                   help="Compute the logit lens with the LM head in this dtype (cheaper checks on an fp32 model); "
                   "the classifier is trained, calibrated and run the same way. Default: the model's dtype.")
    add_run_args(p)


def add_run_args(p) -> None:
    """`--seed`, `--batch-size` and `--quiet`."""
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="Seed of splits, demonstrations and training (default 0).")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="Prompts per forward pass (default 8).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
# fmt: on
