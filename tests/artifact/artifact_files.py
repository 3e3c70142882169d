"""What the artifact tests share: the training data of their estimators, a stock checkpoint to load classifiers
beside, and crafted files resealed with a manifest exactly as a save writes it (`artifact.manifest.manifest_text`
over the files present), so that a test reaches the validation of the file's content, not the manifest check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tiny_models import make_pair

from adainfer_hf.artifact.constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
)
from adainfer_hf.artifact.manifest import manifest_text

ARTIFACT_NAMES = (*ARTIFACT_DATA_NAMES, CLASSIFIER_MANIFEST_NAME)
RNG = np.random.default_rng(0)
X = RNG.uniform(size=(200, 2))
Y = (X[:, 0] + 0.3 * X[:, 1] > 0.6).astype(int)
X_TEST = np.random.default_rng(1).uniform(size=(300, 2))


def reseal(directory: Path) -> None:
    """Rewrite the manifest of `directory` over the artifact files now present, as a save does."""
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


def edit_config(directory: Path, **changes) -> None:
    """Change fields of the artifact's config file (JSON) and reseal the manifest."""
    path = directory / CLASSIFIER_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    reseal(directory)


def stock_dir(tmp_path):
    """A saved stock Llama checkpoint (`tmp_path / "stock"`, written once per test)."""
    path = tmp_path / "stock"
    if not path.is_dir():
        stock, _ = make_pair("llama_gqa")
        stock.save_pretrained(path)
    return path
