"""Atomic saves and the manifest: a save that fails or is interrupted at any step leaves the old artifact or none,
a mixed artifact is refused naming the file, nothing is written outside the target (a mount point under a read-only
parent), and a model's save_pretrained fails when its classifier's save does.

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
from artifact_files import ARTIFACT_NAMES, X_TEST, X, Y, stock_dir
from sklearn.svm import SVC
from tiny_models import make_pair

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)


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
        AdaInferLlamaForCausalLM.from_pretrained(stock_dir(tmp_path), exit_classifier=tmp_path / "old")


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


def _fail_after_replace(monkeypatch, step: int, fault: BaseException):
    """Make the `step`-th `os.replace` onto an artifact file happen, then raise `fault` (before the save can record
    that it happened: a Ctrl-C landing right after the rename)."""
    real = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        out = real(src, dst, *args, **kwargs)
        if Path(dst).name in ARTIFACT_NAMES:
            calls.append(Path(dst).name)
            if len(calls) - 1 == step:
                raise fault
        return out

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize(("legacy", "step"), STEPS)
def test_a_save_interrupted_right_after_a_rename_leaves_the_old_artifact_or_none(tmp_path, monkeypatch, step,
                                                                                 legacy):
    # Issue 28.11: the save recorded a rename only after it returned, so a Ctrl-C between the two left the new file
    # beside the old ones (refused on load, but not the "removes the files it replaced" the README promises).
    target = tmp_path / "clf"
    _old().save_pretrained(target)
    if legacy:
        (target / CLASSIFIER_MANIFEST_NAME).unlink()
    old_files = _artifact(target)
    calls = _fail_after_replace(monkeypatch, step, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _new().save_pretrained(target)
    assert len(calls) == step + 1
    monkeypatch.undo()
    _assert_old_exactly_or_none(target, old_files)  # (after the manifest's rename too: the save did not return)
