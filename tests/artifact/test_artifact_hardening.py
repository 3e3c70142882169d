"""Hardening of the exit-classifier artifact: atomic saves with a manifest, the pickle rule beside checkpoints,
crafted files.

The reference for "nothing changed" is always the bytes of the previous artifact and the decisions of the
estimator it was saved from.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC
from tiny_models import make_pair

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import (
    ARTIFACT_DATA_NAMES,
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)

ARTIFACT_NAMES = (*ARTIFACT_DATA_NAMES, CLASSIFIER_MANIFEST_NAME)
RNG = np.random.default_rng(0)
X = RNG.uniform(size=(200, 2))
Y = (X[:, 0] + 0.3 * X[:, 1] > 0.6).astype(int)
X_TEST = np.random.default_rng(1).uniform(size=(300, 2))


def _old():
    return ExitClassifier(GapThresholdRule(threshold=0.5).fit(X), min_layer=1)


def _new():
    return ExitClassifier(SVC(gamma=2.0).fit(X, Y), min_layer=2, threshold=0.25, check_layers=[2, 3])


def _artifact(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ARTIFACT_NAMES if (directory / name).is_file()}


def _fail_at_replace(monkeypatch, step: int, fault: BaseException):
    """Make the `step`-th `os.replace` onto an artifact file raise `fault` (the others run)."""
    real = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name in ARTIFACT_NAMES:
            calls.append(Path(dst).name)
            if len(calls) - 1 == step:
                raise fault
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _assert_old_exactly_or_none(directory: Path, old_files: dict[str, bytes]):
    """After a failed save: the old artifact byte for byte (plus, for a legacy one, the manifest of its files),
    which loads with the old decisions; or no artifact at all, which loading refuses. Never a mix."""
    left = _artifact(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a legacy artifact warns that it has no manifest
        if not left:
            with pytest.raises(FileNotFoundError, match=CLASSIFIER_CONFIG_NAME):
                ExitClassifier.from_pretrained(directory)
            return
        if CLASSIFIER_MANIFEST_NAME not in old_files:
            left.pop(CLASSIFIER_MANIFEST_NAME, None)
        assert left == old_files, f"a mix was left behind: {sorted(left)}"
        loaded = ExitClassifier.from_pretrained(directory)
    assert type(loaded.estimator) is GapThresholdRule and loaded.min_layer == 1 and loaded.threshold is None
    np.testing.assert_array_equal(loaded.exit_mask(X_TEST), _old().exit_mask(X_TEST))


# ---------------------------------------------------------------------- item 14: atomic saves and the manifest
# The renames of a save: joblib, safetensors, config, manifest; over a legacy artifact (no manifest) the manifest of
# the old files comes first.
STEPS = [(False, step) for step in range(4)] + [(True, step) for step in range(5)]


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(errno.EXDEV, "Invalid cross-device link")],
                         ids=["ctrl-c", "exdev"])
@pytest.mark.parametrize(("legacy", "step"), STEPS)
def test_a_save_failing_at_any_step_leaves_the_old_artifact_or_none(tmp_path, monkeypatch, step, fault, legacy):
    target = tmp_path / "clf"
    _old().save_pretrained(target)
    if legacy:
        (target / CLASSIFIER_MANIFEST_NAME).unlink()
    old_files = _artifact(target)
    calls = _fail_at_replace(monkeypatch, step, fault)
    with pytest.raises(type(fault)):
        _new().save_pretrained(target)
    assert len(calls) == step + 1
    monkeypatch.undo()
    _assert_old_exactly_or_none(target, old_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # nothing written beside the target
    assert not [p for p in target.iterdir() if ".tmp-" in p.name]  # nor temporary files left inside it


def test_a_mixed_artifact_is_refused_naming_the_file(tmp_path):
    _old().save_pretrained(tmp_path / "old")
    _new().save_pretrained(tmp_path / "new")
    # What a save killed (SIGKILL, power loss) after moving the estimator files but before the config leaves.
    for name in (CLASSIFIER_WEIGHTS_NAME, CLASSIFIER_SAFE_NAME):
        shutil.copy(tmp_path / "new" / name, tmp_path / "old" / name)
    where = repr(os.fspath(tmp_path / "old"))
    with pytest.raises(ValueError, match=rf"artifact in {where} is incomplete or mixed: exit_classifier.joblib does "
                                         r"not match the manifest.*re-save it"):
        ExitClassifier.from_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match="incomplete or mixed"):
        AdaInferLlamaForCausalLM.from_pretrained(_stock_dir(tmp_path), exit_classifier=tmp_path / "old")


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path):
    _old().save_pretrained(tmp_path)
    (tmp_path / CLASSIFIER_WEIGHTS_NAME).unlink()  # an artifact may ship without one of its files: it still loads
    ExitClassifier.from_pretrained(tmp_path)
    manifest = json.loads((tmp_path / CLASSIFIER_MANIFEST_NAME).read_text())
    del manifest["sha256"][CLASSIFIER_SAFE_NAME]
    (tmp_path / CLASSIFIER_MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{CLASSIFIER_SAFE_NAME} is not listed in {CLASSIFIER_MANIFEST_NAME}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_an_artifact_without_manifest_loads_with_one_warning(tmp_path):
    _old().save_pretrained(tmp_path)
    (tmp_path / CLASSIFIER_MANIFEST_NAME).unlink()  # as an earlier adainfer-hf wrote it
    with pytest.warns(UserWarning, match=f"has no {CLASSIFIER_MANIFEST_NAME}"):
        first = ExitClassifier.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = ExitClassifier.from_pretrained(tmp_path)  # warned once
    assert type(first.estimator) is type(second.estimator) is GapThresholdRule
    _new().save_pretrained(tmp_path)  # saving again adds the manifest
    assert (tmp_path / CLASSIFIER_MANIFEST_NAME).is_file()


def test_the_shipped_artifact_has_a_manifest_and_loads_silently():
    from adainfer_hf.models.default_model import shipped_classifier_dir

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = ExitClassifier.from_pretrained(shipped_classifier_dir())
    assert clf.num_layers == 30 and (shipped_classifier_dir() / CLASSIFIER_MANIFEST_NAME).is_file()


def _outside(path, inside: Path) -> bool:
    resolved = Path(os.path.abspath(os.fspath(path)))
    return resolved != inside and inside not in resolved.parents


@pytest.fixture
def mount_point_under_read_only_parent(tmp_path, monkeypatch):
    """`tmp_path/ro/mnt`: `mnt` is a writable mount point, `ro` (and everything else) read-only.

    We run as root, where chmod does not stop writes, so every way of creating a file or directory outside `mnt`
    raises EROFS, and a rename between directories raises EXDEV (another file system).
    """
    mount = tmp_path / "ro" / "mnt"
    mount.mkdir(parents=True)
    outside_writes = []

    def refuse_outside(path, what):
        if path is not None and not isinstance(path, int) and _outside(path, mount):
            outside_writes.append((what, os.fspath(path)))
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open
    real_mkdtemp, real_mkstemp = tempfile.mkdtemp, tempfile.mkstemp

    def mkdir(path, *args, **kwargs):
        refuse_outside(path, "mkdir")
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse_outside(path, "os.open")
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse_outside(file, "open")
        return real_open(file, mode, *args, **kwargs)

    def mkdtemp(suffix=None, prefix=None, dir=None):
        refuse_outside(dir or tempfile.gettempdir(), "mkdtemp")
        return real_mkdtemp(suffix, prefix, dir)

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        refuse_outside(dir or tempfile.gettempdir(), "mkstemp")
        return real_mkstemp(suffix, prefix, dir, text)

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)) and (
                _outside(src, mount) or _outside(dst, mount)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", os.fspath(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", replace)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    yield mount, outside_writes
    monkeypatch.undo()


def test_save_into_a_mount_point_under_a_read_only_parent(mount_point_under_read_only_parent):
    mount, outside_writes = mount_point_under_read_only_parent
    _old().save_pretrained(mount)
    _new().save_pretrained(mount)  # over an existing artifact too
    assert outside_writes == [] and sorted(p.name for p in mount.parent.iterdir()) == ["mnt"]
    loaded = ExitClassifier.from_pretrained(mount)
    assert loaded.min_layer == 2 and loaded.check_layers == (2, 3)
    np.testing.assert_array_equal(loaded.exit_mask(X_TEST), _new().exit_mask(X_TEST))


def test_model_save_pretrained_into_a_mount_point_under_a_read_only_parent(mount_point_under_read_only_parent):
    mount, outside_writes = mount_point_under_read_only_parent
    _, ada = make_pair("llama_gqa")
    ada.exit_classifier = _new()
    ada.save_pretrained(mount)
    assert outside_writes == [] and sorted(p.name for p in mount.parent.iterdir()) == ["mnt"]
    assert {CLASSIFIER_CONFIG_NAME, CLASSIFIER_MANIFEST_NAME, "model.safetensors"} <= set(os.listdir(mount))
    assert AdaInferLlamaForCausalLM.from_pretrained(mount).exit_classifier.min_layer == 2


def _stock_dir(tmp_path):
    path = tmp_path / "stock"
    if not path.is_dir():
        stock, _ = make_pair("llama_gqa")
        stock.save_pretrained(path)
    return path


@pytest.mark.parametrize("step", [0, 2])
def test_a_failed_classifier_save_makes_model_save_pretrained_fail(tmp_path, monkeypatch, step):
    _, ada = make_pair("llama_gqa")
    ada.exit_classifier = _old()
    ada.save_pretrained(tmp_path)
    old_files = _artifact(tmp_path)
    ada.exit_classifier = _new()
    _fail_at_replace(monkeypatch, step, OSError(errno.EXDEV, "Invalid cross-device link"))
    state = "still holds its previous exit classifier" if step == 0 else "holds no exit classifier"
    with pytest.raises(OSError, match=rf"weights to {repr(os.fspath(tmp_path))} but not its exit classifier.*"
                                      rf"cross-device.*{state}") as info:
        ada.save_pretrained(tmp_path)
    assert info.value.errno == errno.EXDEV
    monkeypatch.undo()
    _assert_old_exactly_or_none(tmp_path, old_files)
    reloaded = AdaInferLlamaForCausalLM.from_pretrained(tmp_path)
    assert (reloaded.exit_classifier is None) == (step != 0)


def test_a_classifier_that_cannot_be_saved_fails_before_the_weights_are_written(tmp_path):
    _, ada = make_pair("llama_gqa")
    ada.exit_classifier = _old().replace(calibration={"figure": object()})  # not JSON
    with pytest.raises(ValueError, match="calibration"):
        ada.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- item 13: no silent unpickling beside a checkpoint
class _Payload:
    """Unpickling this runs `Path(marker).touch()`: the stand-in for a malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model_dir_with_joblib(tmp_path, payload=True, safe=False) -> Path:
    """A checkpoint with an exit classifier beside it whose joblib file is `_Payload` (and a manifest that matches:
    a crafted Hub repo can carry one), as `snapshot_download` / `hf download --local-dir` / `git clone` leave it."""
    import joblib
    from sklearn.tree import DecisionTreeClassifier

    from adainfer_hf.artifact.manifest import manifest_text

    stock, ada = make_pair("llama_gqa")
    path = tmp_path / "downloaded"
    stock.save_pretrained(path)
    estimator = (LogisticRegression() if safe else DecisionTreeClassifier(max_depth=2, random_state=0)).fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree has no safetensors encoding
        ExitClassifier(estimator).bind(ada).save_pretrained(path)
    assert (path / CLASSIFIER_SAFE_NAME).is_file() == safe
    if payload:
        joblib.dump(_Payload(tmp_path / "marker"), path / CLASSIFIER_WEIGHTS_NAME)
        files = {n: (path / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (path / n).is_file()}
        (path / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))
    return path


def test_a_joblib_beside_a_checkpoint_is_not_unpickled_when_only_the_model_is_named(tmp_path):
    from adainfer_hf import load_adainfer_model

    path = _model_dir_with_joblib(tmp_path)
    marker = tmp_path / "marker"
    where = repr(os.fspath(path))
    for load in (AdaInferLlamaForCausalLM.from_pretrained, load_adainfer_model):
        with pytest.raises(ValueError, match=rf"{where} holds an exit classifier as {CLASSIFIER_WEIGHTS_NAME} only.*"
                                             rf"exit_classifier={where}.*trust_remote_classifier=True"):
            load(path)
        assert not marker.exists()
    assert AdaInferLlamaForCausalLM.from_pretrained(path, exit_classifier=None).exit_classifier is None
    assert not marker.exists()
    # The flag is what stands between the file and its code: with it the payload runs (and is no classifier).
    with pytest.raises(ValueError, match="estimator"):
        AdaInferLlamaForCausalLM.from_pretrained(path, trust_remote_classifier=True)
    assert marker.exists()


def test_a_joblib_beside_a_checkpoint_loads_when_named_or_trusted(tmp_path):
    path = _model_dir_with_joblib(tmp_path, payload=False)
    for kwargs in ({"exit_classifier": path}, {"exit_classifier": os.fspath(path)}, {"trust_remote_classifier": True}):
        model = AdaInferLlamaForCausalLM.from_pretrained(path, **kwargs)
        assert type(model.exit_classifier.estimator).__name__ == "DecisionTreeClassifier"
    assert type(ExitClassifier.from_pretrained(path).estimator).__name__ == "DecisionTreeClassifier"


def test_the_safetensors_encoding_is_preferred_beside_a_checkpoint(tmp_path):
    path = _model_dir_with_joblib(tmp_path, safe=True)  # a pickle beside a safe file is never read
    model = AdaInferLlamaForCausalLM.from_pretrained(path)
    assert type(model.exit_classifier.estimator) is LogisticRegression
    assert not (tmp_path / "marker").exists()


# ---------------------------------------------------------------------- item 11: crafted files fail at load time
def _recraft(directory: Path, edit) -> None:
    """Rewrite the safetensors encoding with `edit(tensors, estimator_spec)` and a manifest that matches (a crafted
    file need not be a damaged one: it can come with its own manifest)."""
    import safetensors.numpy
    from safetensors import safe_open

    from adainfer_hf.artifact.manifest import manifest_text

    path = directory / CLASSIFIER_SAFE_NAME
    with safe_open(path, framework="np") as f:
        header = json.loads(f.metadata()["adainfer_hf"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    edit(tensors, header["estimator"])
    safetensors.numpy.save_file(tensors, path, metadata={"adainfer_hf": json.dumps(header)})
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


def _set(key, value):
    def edit(tensors, spec):
        tensors[key] = value
    return edit


def _svc_edit(key, fn):
    def edit(tensors, spec):
        tensors[key] = fn(tensors[key])
    return edit


def _scalar(name, value):
    def edit(tensors, spec):
        spec["scalars"][name] = value
    return edit


def _pipeline():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), SVC()).fit(X, Y)


CRAFTED = {
    "coef_-3-columns": (lambda: LogisticRegression().fit(X, Y), _set("coef_", np.ones((1, 3))),
                        r"coef_ has shape \(1, 3\); expected \(1, 2\)"),
    "intercept_-2": (lambda: LogisticRegression().fit(X, Y), _set("intercept_", np.zeros(2)),
                     r"intercept_ has shape \(2,\); expected \(1,\)"),
    "coef_-nan": (lambda: LogisticRegression().fit(X, Y), _set("coef_", np.array([[np.nan, 1.0]])),
                  "coef_ holds non-finite values"),
    "n_features_in_-3": (lambda: LogisticRegression().fit(X, Y), _scalar("n_features_in_", 3),
                         r"coef_ has shape \(1, 2\); expected \(1, 3\)"),
    "gap-rule-feature_index": (lambda: GapThresholdRule().fit(X), lambda t, s: s["params"].update(feature_index=4),
                               r"params.feature_index=4 must be an int in \[0, 1\]"),
    "svc-support-vectors-3-columns": (lambda: SVC().fit(X, Y),
                                      _svc_edit("support_vectors_", lambda v: np.hstack([v, v[:, :1]])),
                                      r"support_vectors_ has shape \(\d+, 3\); expected \(n, 2\)"),
    "svc-n_support-sum": (lambda: SVC().fit(X, Y), _svc_edit("_n_support", lambda v: v + np.int32(5)),
                          r"_n_support=\[\d+, \d+\] must be >= 0 and sum to the \d+ support vectors"),
    "svc-dual_coef-short": (lambda: SVC().fit(X, Y), _svc_edit("_dual_coef_", lambda v: v[:, 1:]),
                            r"_dual_coef_ has shape \(1, \d+\); expected \(1, \d+\)"),
    "svc-float32-vectors": (lambda: SVC().fit(X, Y), _svc_edit("support_vectors_", lambda v: v.astype(np.float32)),
                            "support_vectors_ has dtype float32; expected float64"),
    "scaler-mean_-3": (_pipeline, _set("steps.0.mean_", np.zeros(3)),
                       r"steps.0.mean_ has shape \(3,\); expected \(2,\)"),
    "scaler-scale_-1": (_pipeline, _set("steps.0.scale_", np.ones(1)),
                        r"steps.0.scale_ has shape \(1,\); expected \(2,\)"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_an_inconsistent_estimator_encoding_fails_at_load_naming_the_file_and_field(tmp_path, case):
    fit, edit, message = CRAFTED[case]
    ExitClassifier(fit()).save_pretrained(tmp_path)
    _recraft(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_SAFE_NAME}.*invalid estimator encoding: .*{message}"):
        ExitClassifier.from_pretrained(tmp_path)


FP = r"lm_head_fingerprint"
FINGERPRINTS = {
    "not-an-object": ("abc", rf"{FP} must be an object with 'shape' and 'sample'; got str 'abc'"),
    "no-shape": ({"sample": [0.1]}, rf"{FP}\['shape'\] must be a non-empty list of positive ints; got None"),
    "shape-a-string": ({"shape": "99x32", "sample": [0.1]}, rf"{FP}\['shape'\] must be .*; got '99x32'"),
    "sample-a-string": ({"shape": [99, 32], "sample": "x"}, rf"{FP}\['sample'\] must be a list of numbers; got str"),
    "sample-with-text": ({"shape": [99, 32], "sample": [0.1, "a"]}, rf"{FP}\['sample'\]\[1\] must be a finite number"),
    "sha256-a-number": ({"shape": [99, 32], "sample": [0.1], "sha256": 5}, rf"{FP}\['sha256'\] must be a string"),
}


def _edit_config(directory: Path, **changes) -> None:
    from adainfer_hf.artifact.manifest import manifest_text

    path = directory / CLASSIFIER_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


@pytest.mark.parametrize("case", list(FINGERPRINTS))
def test_a_malformed_fingerprint_fails_at_load_naming_the_file_and_field(tmp_path, case):
    value, message = FINGERPRINTS[case]
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path / "clf")
    _edit_config(tmp_path / "clf", lm_head_fingerprint=value)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        ExitClassifier.from_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        AdaInferLlamaForCausalLM.from_pretrained(_stock_dir(tmp_path), exit_classifier=tmp_path / "clf")
    with pytest.raises(ValueError, match=rf"^{message}"):  # built directly: no file to name
        ExitClassifier(GapThresholdRule().fit(X), lm_head_fingerprint=value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("features", 5, "features must be a list of feature names; got 5"),
    ("check_layers", 3, "check_layers must be a list of ints or null; got 3"),
    ("min_layer", "2", "min_layer must be an int; got '2'"),
    ("threshold", True, "threshold must be a number or null; got True"),
])
def test_a_config_field_of_the_wrong_type_fails_naming_the_file_and_field(tmp_path, field, value, message):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}: {message}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_a_config_that_contradicts_its_estimator_names_the_file(tmp_path):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    _edit_config(tmp_path, features=["gap", "top_prob", "kl_prev"])
    with pytest.raises(ValueError, match=rf"Invalid exit classifier in '.*{CLASSIFIER_CONFIG_NAME}': .*n_features_in_=2"):
        ExitClassifier.from_pretrained(tmp_path)


def _gated(hidden_size=4):
    from adainfer_hf.policy.gate import LinearGate

    gate = LinearGate([1, 2], np.ones((2, hidden_size)), np.zeros(2), np.zeros(2))
    return ExitClassifier(GapThresholdRule().fit(X), gate=gate)


def _regate(directory: Path, edit) -> None:
    """Rewrite the gate file with `edit(tensors)` and a manifest that matches."""
    import safetensors.numpy

    from adainfer_hf.artifact.constants import CLASSIFIER_GATE_NAME
    from adainfer_hf.artifact.manifest import manifest_text

    path = directory / CLASSIFIER_GATE_NAME
    tensors = dict(safetensors.numpy.load_file(path))
    edit(tensors)
    path.write_bytes(safetensors.numpy.save(tensors))
    files = {n: (directory / n).read_bytes() for n in ARTIFACT_DATA_NAMES if (directory / n).is_file()}
    (directory / CLASSIFIER_MANIFEST_NAME).write_text(manifest_text(files))


GATES = {
    "weight-wrong-rows": (lambda t: t.update({"gate.weight": np.ones((3, 4), np.float32)}),
                          r"exit_gate.safetensors: LinearGate weight must have shape \(2, hidden_size\)"),
    "missing-bias": (lambda t: t.pop("gate.bias"), r"exit_gate.safetensors: missing gate arrays \['gate.bias'\]"),
    "weight-nan": (lambda t: t.update({"gate.weight": np.full((2, 4), np.nan, np.float32)}),
                   "exit_gate.safetensors: LinearGate weight and bias must be finite"),
    "other-thresholds": (lambda t: t.update({"gate.threshold": np.ones(2, np.float32)}),
                         "exit_gate.safetensors has fingerprint .* but the config records gate_fingerprint"),
}


@pytest.mark.parametrize("case", list(GATES))
def test_a_crafted_gate_file_fails_at_load_naming_the_file(tmp_path, case):
    edit, message = GATES[case]
    _gated().save_pretrained(tmp_path)
    _regate(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CLASSIFIER_CONFIG_NAME}.*{message}"):
        ExitClassifier.from_pretrained(tmp_path)


def test_a_config_naming_a_gate_without_its_file_is_refused(tmp_path):
    ExitClassifier(GapThresholdRule().fit(X)).save_pretrained(tmp_path)
    _edit_config(tmp_path, gate_fingerprint="0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="names a gate .* but exit_gate.safetensors is missing"):
        ExitClassifier.from_pretrained(tmp_path)
