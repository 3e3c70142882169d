"""Stamped benchmark results: the one writer every benchmark uses for `docs/results/<model>/<question>/<date>.json`.

A result is only worth keeping if it says what produced it. [`stamp`] records the commit (and whether the work
tree had uncommitted changes), the versions of the packages that decide the numbers, the device (CPU model and
threads; the GPU when CUDA is there), the UTC date and the command line. The command line is scrubbed of machine
paths, so no result file names a temporary directory, a home directory or a model cache: such paths become
placeholders (`<tmp>`, `~`, `$ADAINFER_BENCH_MODELS`, ...), and a classifier directory is replaced by a reference to
its recorded config (`<classifier:0>`, with the config under `"classifiers"`), because the config is what another
machine can reproduce, not the path. [`write_result`] writes the stamp and the payload atomically.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file

__all__ = ["PACKAGES", "RESULTS_ROOT", "newest_result", "read_result", "result_files", "result_path", "scrub_argv",
           "scrub_path", "stamp", "write_result"]

PACKAGES = ("adainfer_hf", "torch", "transformers", "numpy")
"""Distributions whose versions a stamp records (Python's own version is recorded beside them)."""

RESULTS_ROOT = Path("docs") / "results"
"""Where results live, relative to the repository root."""

# environment variables naming machine-specific roots, replaced by their name (longest value first)
_ENV_ROOTS = ("ADAINFER_BENCH_MODELS", "ADAINFER_HOME", "HF_HOME", "VIRTUAL_ENV")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


_STARTED = time.time()  # when this process imported the writer (a benchmark's start): the code it runs


def _commit(source: Path, started: float | None = None) -> dict[str, Any]:
    """The commit of the repository holding `source` when this process started (`started`, default: when this
    module was imported) and whether tracked files differ from HEAD now (None outside a repository, e.g. an
    installed wheel). A long run's code is the commit it started on: when commits landed while it ran, the stamp
    names the newest commit before the start and records the HEAD it wrote under as `head_at_write`."""
    head = _git("rev-parse", "HEAD", cwd=source)
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=source)
    out = {"commit": head, "dirty": bool(status) if status is not None else None}
    started = _STARTED if started is None else started
    committed = _git("log", "-1", "--format=%ct", "HEAD", cwd=source)
    if committed is not None and committed.isdigit() and int(committed) > started:
        log = (_git("log", "--first-parent", "-n", "500", "--format=%H %ct", "HEAD", cwd=source) or "").splitlines()
        before = next((h for h, t in (line.split() for line in log) if int(t) <= started), None)
        out.update(commit=before, head_at_write=head)
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device() -> dict[str, Any]:
    device: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        device["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
        device["cuda"] = torch.version.cuda
    return device


def _placeholders() -> list[tuple[str, str]]:
    """`(machine prefix, placeholder)` pairs, longest prefix first (a model cache under home names the cache)."""
    pairs = [(os.environ[name], f"${name}") for name in _ENV_ROOTS if os.environ.get(name)]
    pairs += [(tempfile.gettempdir(), "<tmp>"), ("/tmp", "<tmp>"), (os.path.expanduser("~"), "~")]
    pairs = [(str(Path(prefix)), holder) for prefix, holder in pairs if prefix and Path(prefix).is_absolute()]
    return sorted(set(pairs), key=lambda pair: -len(pair[0]))


def _scrub_path(text: str, cwd: str, pairs: list[tuple[str, str]]) -> str:
    if not os.path.isabs(text):
        return text
    norm = str(Path(text))
    if norm == cwd or norm.startswith(cwd + os.sep):  # inside the repository: relative to it
        return os.path.relpath(norm, cwd)
    for prefix, holder in pairs:
        if prefix != os.sep and (norm == prefix or norm.startswith(prefix + os.sep)):
            return holder + norm[len(prefix):]
    return f"<path>/{Path(norm).name}"  # any other machine path: only its last component says anything


def scrub_argv(argv: Sequence[str], classifiers: Mapping[str, Any] | None = None,
               cwd: str | os.PathLike | None = None) -> tuple[list[str], list[Any]]:
    """The command line with machine paths replaced, and the configs of the classifiers it named.

    Args:
        argv (`Sequence[str]`): the command line (e.g. `sys.argv`).
        classifiers (`Mapping[str, Any]`, *optional*): classifier directories as they appear in `argv`, mapped to
            their configs (a JSON-able dict, e.g. `dataclasses.asdict(clf.config)`). Each such argument becomes
            `<classifier:i>`, `i` indexing the returned list.
        cwd (`str` or `os.PathLike`, *optional*): the repository root; paths under it are written relative to it.
            Defaults to the current directory.

    Returns:
        `tuple`: the scrubbed arguments and the list of classifier configs they refer to. An absolute path under
        a temporary directory becomes `<tmp>/...`, under a model cache named by an environment variable
        (`ADAINFER_BENCH_MODELS`, `ADAINFER_HOME`, `HF_HOME`) that variable's name, under home `~/...`; any other
        absolute path outside the repository keeps only its last component (`<path>/name`). `--opt=PATH` forms
        are scrubbed after the `=`.
    """
    if isinstance(argv, str):
        raise TypeError(f"argv must be a sequence of strings (e.g. sys.argv), not one string; got {argv!r}.")
    root = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
    pairs = _placeholders()
    known = {str(Path(path)): i for i, path in enumerate(classifiers or {})}
    configs = list((classifiers or {}).values())
    out = []
    for arg in map(str, argv):
        option, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        name, named, path = value.partition("=")  # NAME=DIR (e.g. `--classifier drafting=DIR`)
        if named and str(Path(value)) not in known and (str(Path(path)) in known or os.path.isabs(path)):
            option, sep, value = f"{option}{sep}{name}", "=", path
        key = str(Path(value)) if value else value
        if key in known:
            value = f"<classifier:{known[key]}>"
        else:
            value = _scrub_path(value, root, pairs)
        out.append(f"{option}{sep}{value}")
    return out, [_scrub_config(c, root, pairs) for c in configs]


def _scrub_config(config: Any, root, pairs) -> Any:
    """A classifier config with its machine paths (e.g. `base_model_name_or_path`) scrubbed."""
    if isinstance(config, Mapping):
        return {k: _scrub_config(v, root, pairs) for k, v in config.items()}
    if isinstance(config, str) and os.path.isabs(config):
        return _scrub_path(config, root, pairs)
    return config


def stamp(argv: Sequence[str], classifiers: Mapping[str, Any] | None = None,
          cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """What produced a result: commit, package versions, device, date and the scrubbed command line.

    Args:
        argv (`Sequence[str]`): the command line (e.g. `sys.argv`).
        classifiers (`Mapping[str, Any]`, *optional*): classifier directories named in `argv` and their configs
            (see [`scrub_argv`]).
        cwd (`str` or `os.PathLike`, *optional*): the repository root (defaults to the current directory).

    Returns:
        `dict`: `commit` (hex or None outside a git repository), `dirty` (tracked files differ from the commit),
        `versions` (`adainfer_hf`, `torch`, `transformers`, `numpy`, `python`), `device` (`cpu` model,
        `cpu_count`, `torch_threads`, `platform`; `gpu` and `cuda` when CUDA is available), `date` (UTC, ISO 8601
        to the second), `argv` (scrubbed) and `classifiers` (the configs `argv` refers to).
    """
    args, configs = scrub_argv(argv, classifiers, cwd)
    return {**_commit(Path(__file__).resolve().parent), "versions": _versions(), "device": _device(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "argv": args,
            "classifiers": configs}


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} must be a plain name (letters, digits, '.', '_', '-'; no path separators); "
                         f"got {value!r}.")
    return value


def result_path(model: str, question: str, date: str, root: str | os.PathLike = RESULTS_ROOT, *,
                variant: str | None = None) -> Path:
    """`root/<model>/<question>/<date>[-<variant>].json` after checking that each part is a plain name."""
    stem = _check_name("date", date) + (f"-{_check_name('variant', variant)}" if variant else "")
    return Path(root) / _check_name("model", model) / _check_name("question", question) / (stem + ".json")


def _jsonable(value: Any) -> Any:
    """Numpy and torch scalars/arrays as Python values; non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(model: str, question: str, payload: Mapping[str, Any], argv: Sequence[str], *,
                 classifiers: Mapping[str, Any] | None = None, root: str | os.PathLike = RESULTS_ROOT,
                 cwd: str | os.PathLike | None = None, variant: str | None = None) -> Path:
    """Writes `{"stamp": stamp(argv), "result": payload}` to `root/<model>/<question>/<date>.json`, atomically.

    Args:
        model (`str`): the model key (e.g. `"gemma3-270m"`).
        question (`str`): what the benchmark answers (e.g. `"lossless"`).
        payload (`Mapping`): the numbers; numpy/torch values are converted, NaN and infinities become null.
        argv (`Sequence[str]`): the command line that produced them.
        classifiers (`Mapping[str, Any]`, *optional*): classifier directories in `argv` and their configs.
        root (`str` or `os.PathLike`, *optional*, defaults to `docs/results`): the results root.
        cwd (`str` or `os.PathLike`, *optional*): the repository root for path scrubbing (current directory).
        variant (`str`, *optional*): a plain name appended to the date (`<date>-<variant>.json`), for runs of the
            same question that answer it differently (another setting, a subset) and must not replace each other.

    Returns:
        `Path`: the file written. `<date>` is the stamp's UTC day (`YYYY-MM-DD`): a later run the same day (and
        variant) replaces the file, so each day keeps one result per model, question and variant.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping (a JSON object); got {type(payload).__name__}.")
    info = stamp(argv, classifiers, cwd)
    path = result_path(model, question, info["date"][:10], root, variant=variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"stamp": info, "result": _jsonable(payload)}, indent=1, sort_keys=True, allow_nan=False)
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return path


def scrub_path(path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
    """One path as a stamp writes it (see [`scrub_argv`]): relative inside the repository, a placeholder for a
    temporary directory, a model cache or home, else only its last component. For paths a payload records (a
    feature-table directory, a model directory), so no result file names a machine path."""
    return scrub_argv([os.fspath(path)], cwd=cwd)[0][0]


def read_result(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(stamp, payload)` of a result file.

    A file [`write_result`] wrote is `{"stamp": ..., "result": payload}`; a file migrated from before stamping has
    its reconstructed `stamp` beside the payload's own keys. Both read the same way here, so a table generator
    never needs to know which kind it has.

    Raises:
        `ValueError`: the file does not hold a JSON object.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a result file holds a JSON object; got {type(data).__name__}.")
    stamp_ = data.get("stamp") if isinstance(data.get("stamp"), dict) else {}
    if set(data) == {"stamp", "result"} and isinstance(data["result"], dict):
        return stamp_, data["result"]
    return stamp_, {k: v for k, v in data.items() if k != "stamp"}


_STEM = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})(?:T(?P<time>\d{4}))?(?:-(?P<variant>.+))?$")


def result_files(model: str, question: str, root: str | os.PathLike = RESULTS_ROOT, *, variant: str | None = "",
                 filename: str | None = None) -> list[Path]:
    """The result files of `model` and `question`, oldest first.

    Args:
        model (`str`), question (`str`): the directory `root/<model>/<question>/`.
        root (`str` or `os.PathLike`, *optional*, defaults to `docs/results`): the results root.
        variant (`str` or `None`, *optional*, defaults to `""`): `""` keeps files without a variant
            (`<date>.json`, `<date>T<hhmm>.json`), a name keeps `<date>-<name>.json`, `None` keeps every file.
        filename (`str`, *optional*): results kept as directories `<date>[-variant]/<filename>` (the reports of
            `adainfer eval`) instead of `<date>[-variant].json` files.

    Returns:
        `list[Path]`: ordered by date, then time of day, then variant; names that do not start with a date are
        left out.
    """
    where = Path(root) / _check_name("model", model) / _check_name("question", question)
    found = []
    if not where.is_dir():
        return []
    candidates = [p / filename for p in where.iterdir() if p.is_dir()] if filename else where.glob("*.json")
    for path in candidates:
        if not path.is_file():
            continue
        m = _STEM.match(path.parent.name if filename else path.stem)
        if m is None or (variant is not None and (m["variant"] or "") != variant):
            continue
        found.append(((m["date"], m["time"] or "", m["variant"] or ""), path))
    return [path for _, path in sorted(found)]


def newest_result(model: str, question: str, root: str | os.PathLike = RESULTS_ROOT, *, variant: str | None = "",
                  filename: str | None = None) -> Path | None:
    """The newest of [`result_files`] (same arguments), or None when there is none."""
    files = result_files(model, question, root, variant=variant, filename=filename)
    return files[-1] if files else None
