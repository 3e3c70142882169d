"""The exit-classifier artifact: a typed config plus a fitted scikit-learn estimator.

An [`ExitClassifier`] lives beside a base model, like a PEFT adapter: it records which features it reads, when it
may fire, and which model it was trained on (name, revision, layer count, LM-head fingerprint), and it implements
the [`~adainfer_hf.policy.ExitPolicy`] contract the decoder loop calls after each checked layer.

On disk an artifact is a directory with

- `exit_classifier_config.json`: [`ExitClassifierConfig`] as sorted, indented JSON;
- `exit_classifier.joblib`: the estimator, pickled (always written; readable by any scikit-learn user);
- `exit_classifier.safetensors`: a pickle-free encoding, written for the estimators this package produces
  (linear models, [`~adainfer_hf.rules.GapThresholdRule`], `SVC`, and `StandardScaler` pipelines of those);
- `exit_classifier_manifest.json`: the sha256 of each file above, written last and checked on load.

Pickles execute code when loaded, so a downloaded artifact is read from its safetensors file, and a download that
only has the joblib file is refused unless the caller passes `trust_remote_classifier=True`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from .artifact_validation import fingerprint_problem
from .classifier_io import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
    ExitClassifierConfig,
    encode_artifact,
    read_hub,
    read_local,
    write_artifact,
)
from .estimator_codec import _is_int, _linear_form, _logit, _qualified_name, _score_kind
from .policy import ExitPolicy, check_dtype_or_raise

__all__ = [
    "CLASSIFIER_CONFIG_NAME",
    "CLASSIFIER_MANIFEST_NAME",
    "CLASSIFIER_SAFE_NAME",
    "CLASSIFIER_WEIGHTS_NAME",
    "ExitClassifier",
    "ExitClassifierConfig",
]

_LABELS = ("final", "gold")


class ExitClassifier(ExitPolicy):
    """A fitted exit classifier with its metadata: the AdaInfer stopping signal as a shareable artifact.

    It reads the per-layer features named in `features` (see `adainfer_hf.features.FEATURES`) and decides, for
    each active row, whether to stop after the current layer. Linear estimators (anything with a single-row
    `coef_` and `intercept_`, including `StandardScaler` pipelines and [`~adainfer_hf.rules.GapThresholdRule`])
    are evaluated on the features' device with torch, without a host synchronisation; other estimators (RBF
    `SVC`, CRF wrappers, ...) run through scikit-learn on the CPU.

    Args:
        estimator (fitted scikit-learn classifier):
            Binary classifier whose positive class `1` means "exit".
        features (`Sequence[str]`, *optional*, defaults to `("gap", "top_prob")`):
            Feature names, in the column order the estimator was trained on.
        threshold (`float`, *optional*):
            `None` fires where `estimator.predict(X) == 1`. Otherwise fires where `score(X) >= threshold`; the
            score is the decision function, or the probability of class 1 for logistic regression (then the
            threshold must lie in (0, 1)). See [`~ExitClassifier.score_kind`].
        min_layer (`int`, *optional*, defaults to 1):
            First 1-based layer after which the classifier may fire.
        check_layers (`Sequence[int]`, *optional*):
            Explicit sorted 1-based layers to check; `None` checks every layer from `min_layer` to `L - 1`.
        decode_check_layers (`Sequence[int]`, *optional*):
            The schedule of cached single-token steps (decode), where a check costs more layers than in a prompt;
            `None` uses `check_layers` there too.
        label (`str`, *optional*, defaults to `"final"`):
            What the estimator was trained to predict: `"final"` (the layer's top-1 equals the final layer's) or
            `"gold"` (it equals the gold answer).
        base_model_name_or_path (`str`, *optional*), base_model_revision (`str`, *optional*):
            The base model the classifier was trained on; filled by [`~ExitClassifier.bind`].
        num_layers (`int`, *optional*):
            The base model's decoder layer count; checked by [`~ExitClassifier.validate_for`].
        lm_head_fingerprint (`dict`, *optional*):
            `architectures.lm_head_fingerprint` of the base model; checked by [`~ExitClassifier.validate_for`].
        calibration (`dict`, *optional*):
            Free-form figures achieved at calibration time (saved in the config).

    Example:

    ```python
    >>> from adainfer_hf import ExitClassifier, GapThresholdRule
    >>> clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]]))
    >>> clf.save_pretrained("gap-rule")
    >>> ExitClassifier.from_pretrained("gap-rule")
    ExitClassifier(GapThresholdRule, features=('gap', 'top_prob'), threshold=None, min_layer=1, ...)
    ```
    """

    def __init__(
        self,
        estimator,
        features=("gap", "top_prob"),
        threshold: float | None = None,
        min_layer: int = 1,
        check_layers=None,
        check_dtype: str | None = None,
        label: str = "final",
        decode_check_layers=None,
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        num_layers: int | None = None,
        lm_head_fingerprint: dict | None = None,
        calibration: dict | None = None,
    ):
        self.estimator = estimator
        self.features = (features,) if isinstance(features, str) else tuple(features)
        self.threshold = threshold
        self.min_layer = min_layer
        self.check_layers = None if check_layers is None else tuple(check_layers)
        self.decode_check_layers = None if decode_check_layers is None else tuple(decode_check_layers)
        self.check_dtype = check_dtype
        self.label = label
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.num_layers = num_layers
        self.lm_head_fingerprint = lm_head_fingerprint
        self.calibration = calibration
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Check every parameter against the estimator and each other; the one place that raises on bad values."""
        from .features import FEATURES  # lazy: features.py pulls in the torch feature code

        est = self.estimator
        self._score_kind = _score_kind(est)
        if not hasattr(est, "predict"):
            raise ValueError(
                f"estimator must be a scikit-learn classifier with `predict`; got {type(est).__name__}."
            )
        try:
            check_is_fitted(est)
        except NotFittedError as err:
            raise ValueError(
                f"estimator {type(est).__name__} is not fitted; call `fit` before wrapping it."
            ) from err
        except TypeError as err:
            raise ValueError(f"estimator {est!r} is not a scikit-learn estimator: {err}") from err

        if not self.features or not all(isinstance(f, str) for f in self.features):
            raise ValueError(f"features must be a non-empty sequence of names; got {self.features!r}.")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"Unknown feature(s) {unknown}; expected names from {sorted(FEATURES)}.")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features contains duplicates: {list(self.features)}.")
        n_in = getattr(est, "n_features_in_", None)
        if n_in is not None and int(n_in) != len(self.features):
            raise ValueError(
                f"estimator {type(est).__name__} was fitted on n_features_in_={n_in} columns but "
                f"features={list(self.features)} names {len(self.features)}."
            )
        classes = getattr(est, "classes_", None)
        if classes is not None and (len(classes) != 2 or classes[1] != 1):
            labels = np.asarray(classes).tolist()
            raise ValueError(
                f"estimator must be binary with classes [0, 1] (1 = exit); got classes_={labels!r}."
            )

        if self.num_layers is not None and (not _is_int(self.num_layers) or self.num_layers < 2):
            raise ValueError(f"num_layers must be an int >= 2 or None; got {self.num_layers!r}.")
        top = None if self.num_layers is None else self.num_layers - 1
        allowed = f"[1, {top}]" if top is not None else "[1, num_layers - 1]"
        if not _is_int(self.min_layer) or self.min_layer < 1 or (top is not None and self.min_layer > top):
            raise ValueError(f"min_layer={self.min_layer!r} is out of range; expected an int in {allowed}.")
        for name in ("check_layers", "decode_check_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            layers = list(value)  # `()` is valid: never check, never exit (see calibrate and schedule)
            bad = [k for k in layers if not _is_int(k) or k < 1 or (top is not None and k > top)]
            if bad or layers != sorted(set(layers)):
                raise ValueError(
                    f"{name}={layers!r} must be a sorted list of unique ints in {allowed}"
                    + (f"; offending value(s): {bad}." if bad else ".")
                )
        if self.label not in _LABELS:
            raise ValueError(f"label={self.label!r} is not supported; expected one of {list(_LABELS)}.")
        check_dtype_or_raise(self.check_dtype)
        problem = None if self.lm_head_fingerprint is None else fingerprint_problem(self.lm_head_fingerprint)
        if problem is not None:
            raise ValueError(f"lm_head_fingerprint{'' if problem[0] == '[' else ' '}{problem}.")

        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.number)):
                raise ValueError(f"threshold must be a number or None; got {self.threshold!r}.")
            self.threshold = float(self.threshold)
            if not math.isfinite(self.threshold):
                raise ValueError(f"threshold must be finite; got {self.threshold!r}.")
            if self.score_kind == "probability" and not 0.0 <= self.threshold <= 1.0:
                raise ValueError(
                    f"threshold={self.threshold} is a probability for {type(est).__name__}; expected 0 <= t <= 1."
                )
        # The on-device fast path: (coef, intercept) when the estimator is exactly linear, else None.
        self._linear = _linear_form(est) if self.score_kind != "label" else None
        self._device_cache: dict = {}
        self._warned: set = set()

    @property
    def score_kind(self) -> str:
        """What [`~ExitClassifier.score`] returns and `threshold` compares against: `"probability"` (P(exit), for
        logistic regression and estimators without a decision function), `"decision"` (the signed margin) or
        `"label"` (the 0/1 prediction)."""
        return self._score_kind

    # ------------------------------------------------------------------ decisions
    def score(self, X) -> np.ndarray:
        """Exit score per row (higher = more confident the row may exit); see [`~ExitClassifier.score_kind`].

        Args:
            X (array-like of shape `(n_rows, len(features))`): feature matrix.

        Returns:
            `np.ndarray` of shape `(n_rows,)`, float64.
        """
        kind = self.score_kind
        if kind == "decision":
            return np.asarray(self.estimator.decision_function(X), dtype=np.float64).reshape(-1)
        if kind == "probability":
            return np.asarray(self.estimator.predict_proba(X), dtype=np.float64)[:, 1]
        return np.asarray(self.estimator.predict(X), dtype=np.float64).reshape(-1)

    def exit_mask(self, X) -> np.ndarray:
        """Host-side decision: `True` where a row exits (`predict == 1`, or `score >= threshold` if set).

        Args:
            X (array-like of shape `(n_rows, len(features))`): feature matrix.

        Returns:
            `np.ndarray` of bools, shape `(n_rows,)`.
        """
        if self.threshold is None:
            return np.asarray(self.estimator.predict(X)).reshape(-1) == 1
        return self.score(X) >= self.threshold

    def decide(self, features: torch.Tensor, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The decoder loop's hook (see `ExitPolicy.decide`): a BoolTensor `[n_rows]` on `features.device`.

        Linear estimators run as one matmul on the features' device with no host synchronisation; others copy
        the features to the CPU once and call scikit-learn.
        """
        if features.dim() != 2 or features.shape[1] != len(self.features):
            raise ValueError(
                f"decide() expects features of shape [n_rows, {len(self.features)}] for {list(self.features)}; "
                f"got {tuple(features.shape)}."
            )
        if self._linear is not None:
            coef, intercept = self._device_weights(features.device)
            margin = features.to(coef.dtype) @ coef + intercept
            # `threshold` may be changed after construction (calibration sweeps it), so the cut is not cached.
            if self.threshold is None:
                return margin > 0  # exactly `predict`: class 1 where the margin is > 0
            if self.score_kind == "probability":
                return margin >= _logit(self.threshold)  # P >= t  <=>  logit >= logit(t): stays on the device
            return margin >= self.threshold
        if features.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=features.device)
        X = features.detach().to("cpu", torch.float64).numpy()
        return torch.from_numpy(self.exit_mask(X)).to(features.device)

    def _device_weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device.type, device.index)
        if key not in self._device_cache:
            coef, intercept = self._linear
            # float64 reproduces scikit-learn's arithmetic (it is a [n_rows, F] matmul); MPS has no float64.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._device_cache[key] = (
                torch.tensor(np.array(coef), dtype=dtype, device=device),
                torch.tensor(intercept, dtype=dtype, device=device),
            )
        return self._device_cache[key]

    # ------------------------------------------------------------------ the base model
    def bind(self, model) -> ExitClassifier:
        """Record `model`'s identity (name, revision, layer count, LM-head fingerprint) where still unset.

        Args:
            model (`PreTrainedModel`): the base model the classifier was trained for.

        Returns:
            `ExitClassifier`: `self`.
        """
        from . import architectures

        config = getattr(model, "config", None)
        if self.num_layers is None:
            self.num_layers = architectures.num_layers(model)
        if self.lm_head_fingerprint is None:
            self.lm_head_fingerprint = architectures.lm_head_fingerprint(model)
        if self.base_model_name_or_path is None:
            name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
            self.base_model_name_or_path = name or None
        if self.base_model_revision is None:
            self.base_model_revision = getattr(config, "_commit_hash", None) or None
        self._validate()
        return self

    def validate_for(self, model, ignore_mismatch: bool = False) -> None:
        """Check that `model` is the base model this classifier was trained on.

        Compares the recorded `num_layers` and `lm_head_fingerprint` (when recorded) with the model's.

        Args:
            model (`PreTrainedModel`): the model about to use this classifier.
            ignore_mismatch (`bool`, *optional*, defaults to `False`): warn once instead of raising.

        Raises:
            `ValueError`: naming both values, when they differ and `ignore_mismatch` is False.
        """
        from . import architectures

        problems = []
        n_model = architectures.num_layers(model)
        if self.num_layers is not None and n_model != self.num_layers:
            problems.append(f"num_layers: classifier {self.num_layers} vs model {n_model}")
        if self.lm_head_fingerprint is not None:
            fp = architectures.lm_head_fingerprint(model)
            if not architectures.fingerprints_match(self.lm_head_fingerprint, fp):
                ours = self.lm_head_fingerprint
                problems.append(
                    f"LM-head fingerprint: classifier {ours.get('sha256')} (shape {ours.get('shape')}) vs "
                    f"model {fp.get('sha256')} (shape {fp.get('shape')})"
                )
        if not problems:
            return
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        message = (
            f"ExitClassifier (trained on {self.base_model_name_or_path!r}) does not match the model "
            f"{name!r}: {'; '.join(problems)}. Its exit decisions are only meaningful for its base model; pass "
            "ignore_mismatch=True to use it anyway."
        )
        if not ignore_mismatch:
            raise ValueError(message)
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ serialisation
    @property
    def config(self) -> ExitClassifierConfig:
        """The [`ExitClassifierConfig`] describing this classifier (versions are filled at save time)."""
        return ExitClassifierConfig(
            estimator_class=_qualified_name(self.estimator),
            features=list(self.features),
            threshold=self.threshold,
            min_layer=int(self.min_layer),
            check_layers=None if self.check_layers is None else [int(k) for k in self.check_layers],
            decode_check_layers=None if self.decode_check_layers is None
            else [int(k) for k in self.decode_check_layers],
            check_dtype=self.check_dtype,
            label=self.label,
            base_model_name_or_path=self.base_model_name_or_path,
            base_model_revision=self.base_model_revision,
            num_layers=None if self.num_layers is None else int(self.num_layers),
            lm_head_fingerprint=self.lm_head_fingerprint,
            calibration=self.calibration,
        )

    def replace(self, **changes) -> ExitClassifier:
        """A copy with the same estimator and the given config fields changed (`threshold=`, `check_layers=`, ...)."""
        return type(self)._from_config(dataclasses.replace(self.config, **changes), self.estimator)

    @classmethod
    def _from_config(cls, config: ExitClassifierConfig, estimator) -> ExitClassifier:
        return cls(
            estimator,
            features=config.features,
            threshold=config.threshold,
            min_layer=config.min_layer,
            check_layers=config.check_layers,
            decode_check_layers=config.decode_check_layers,
            check_dtype=config.check_dtype,
            label=config.label,
            base_model_name_or_path=config.base_model_name_or_path,
            base_model_revision=config.base_model_revision,
            num_layers=config.num_layers,
            lm_head_fingerprint=config.lm_head_fingerprint,
            calibration=config.calibration,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the config, the joblib estimator, (when possible) its pickle-free safetensors encoding and the manifest.

        The artifact is written as one unit: every file is encoded first (a classifier that cannot be saved fails
        before anything is written), then written to a temporary name inside `save_directory` and renamed into
        place, the manifest (the sha256 of each file) last. A save interrupted between two renames leaves files
        that no longer match the old manifest, which loading refuses; a save that fails or is interrupted removes
        the artifact files it had started to replace. So a later load finds the previous artifact, or a clear
        error, never a new estimator with an old config. Nothing is written outside `save_directory`.

        Args:
            save_directory (`str` or `os.PathLike`): target directory (created if missing).
        """
        write_artifact(self.estimator, self.config, save_directory)

    def _artifact_files(self) -> dict[str, bytes]:
        """The artifact's files as bytes (`classifier_io.encode_artifact`), for a save in two steps."""
        return encode_artifact(self.estimator, self.config)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        trust_remote_classifier: bool = False,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ) -> ExitClassifier:
        """Load a classifier from a local directory or a Hugging Face Hub repository.

        A local directory you name here is loaded from its safetensors file when present, else from its joblib file
        (naming it is the consent to unpickle it). A Hub repository is loaded from its safetensors file; a
        repository with only a joblib file (a pickle, which runs code when loaded) is refused unless
        `trust_remote_classifier=True`. Either way the files are checked against the artifact's manifest first.
        With `HF_HUB_OFFLINE=1` the Hub files are read from the local cache.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): a directory written by `save_pretrained`, or a repo id.
            revision (`str`, *optional*): branch, tag or commit of the Hub repository.
            trust_remote_classifier (`bool`, *optional*, defaults to `False`): allow unpickling a downloaded joblib.
            cache_dir (`str` or `os.PathLike`, *optional*): Hub cache directory.
            token (`str` or `bool`, *optional*): Hub token.
            local_files_only (`bool`, *optional*): only read the Hub cache, never the network.

        Returns:
            `ExitClassifier`
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            return cls._from_local(path)
        if os.path.exists(path):
            raise ValueError(
                f"{path!r} is a file; expected a directory written by save_pretrained or a repo id."
            )
        config, estimator = read_hub(path, revision, trust_remote_classifier, cache_dir, token, bool(local_files_only))
        return cls._checked(config, estimator, f"{CLASSIFIER_CONFIG_NAME} of Hub repo {path!r}")


    @classmethod
    def _from_local(cls, path: str, allow_pickle: bool = True) -> ExitClassifier:
        """A local artifact directory; `allow_pickle=False` refuses a joblib-only one (see `read_local`)."""
        config, estimator = read_local(Path(path), allow_pickle=allow_pickle)
        return cls._checked(config, estimator, repr(os.path.join(path, CLASSIFIER_CONFIG_NAME)))

    @classmethod
    def _checked(cls, config: ExitClassifierConfig, estimator, source: str) -> ExitClassifier:
        """`_from_config`, with a validation error naming the file it came from."""
        try:
            return cls._from_config(config, estimator)
        except ValueError as err:
            raise ValueError(f"Invalid exit classifier in {source}: {err}") from err

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload exit classifier",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
    ):
        """Save the artifact to a temporary directory and upload it as one commit (the repo is created if needed).

        Args:
            repo_id (`str`): target repository, `"namespace/name"`.
            commit_message (`str`, *optional*, defaults to `"Upload exit classifier"`): the commit message.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str` or `bool`, *optional*): Hub token.
            revision (`str`, *optional*): branch to commit to (created from `main` if missing).

        Returns:
            `huggingface_hub.CommitInfo`: the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )

    def __repr__(self) -> str:
        base = f", base_model={self.base_model_name_or_path!r}" if self.base_model_name_or_path else ""
        layers = f", num_layers={self.num_layers}" if self.num_layers is not None else ""
        check = f", check_layers={self.check_layers}" if self.check_layers is not None else ""
        if self.decode_check_layers is not None:
            check += f", decode_check_layers={self.decode_check_layers}"
        return (
            f"{type(self).__name__}({type(self.estimator).__name__}, features={self.features}, "
            f"threshold={self.threshold}, min_layer={self.min_layer}{check}{base}{layers})"
        )
