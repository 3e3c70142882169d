"""The stamping result writer (`utils.results`): paths scrubbed, stamps that say what ran, atomic files."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from adainfer_hf.utils import results
from adainfer_hf.utils.atomic import abandoned_temporaries

REPO = Path(__file__).resolve().parents[2]


def test_scrub_replaces_machine_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_BENCH_MODELS", "/srv/models/bench")
    home = os.path.expanduser("~")
    clf_dir = tmp_path / "clf"
    argv = ["prog.py", "gemma3-270m", "--classifier", str(clf_dir), f"--out={tmp_path}/x.json",
            "/srv/models/bench/gemma3-270m", f"{home}/notes/prompts.jsonl", str(REPO / "benchmarks" / "data"),
            "/opt/somewhere/else.txt", "--new-tokens", "64"]
    args, configs = results.scrub_argv(argv, {str(clf_dir): {"threshold": 0.5}}, cwd=REPO)
    assert args[:3] == ["prog.py", "gemma3-270m", "--classifier"]
    assert args[3] == "<classifier:0>" and configs == [{"threshold": 0.5}]
    assert args[4] == "--out=<tmp>/" + os.path.relpath(tmp_path / "x.json", tempfile.gettempdir())
    assert args[5] == "$ADAINFER_BENCH_MODELS/gemma3-270m"
    assert args[6] == "~/notes/prompts.jsonl"
    assert args[7] == os.path.join("benchmarks", "data")
    assert args[8] == "<path>/else.txt"
    assert args[9:] == ["--new-tokens", "64"]
    text = " ".join(args)
    for machine in (str(tmp_path), "/srv/models", home + "/", str(REPO)):
        assert machine not in text


def test_scrub_refuses_a_string():
    with pytest.raises(TypeError, match="sequence of strings"):
        results.scrub_argv("python -m x")


def test_stamp_records_what_ran():
    info = results.stamp(["prog", "--threads", "1"], cwd=REPO)
    assert info["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert info["versions"]["transformers"] == transformers.__version__
    assert info["versions"]["numpy"] == np.__version__
    assert info["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["device"]["torch_threads"] == torch.get_num_threads()
    if Path("/proc/cpuinfo").is_file():
        cpuinfo = Path("/proc/cpuinfo").read_text()
        assert info["device"]["cpu"] and info["device"]["cpu"] in cpuinfo
    assert ("gpu" in info["device"]) == torch.cuda.is_available()
    when = dt.datetime.strptime(info["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 120
    assert info["argv"] == ["prog", "--threads", "1"] and info["classifiers"] == []
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO / "src", capture_output=True, text=True)
    if head.returncode != 0:
        assert info["commit"] is None
    else:
        assert info["commit"] == head.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        assert info["dirty"] is bool(status)


def test_write_result_layout_and_content(tmp_path):
    payload = {"ratio": np.float64(1.25), "tokens": np.arange(3), "t": torch.tensor([1.5, 2.0]),
               "missing": float("nan"), "nested": {"n": np.int64(4)}}
    path = results.write_result("gemma3-270m", "lossless", payload, ["prog", str(tmp_path / "out")],
                                root=tmp_path / "results", cwd=REPO)
    data = json.loads(path.read_text(encoding="utf-8"))
    day = data["stamp"]["date"][:10]
    assert path == tmp_path / "results" / "gemma3-270m" / "lossless" / f"{day}.json"
    assert data["result"] == {"ratio": 1.25, "tokens": [0, 1, 2], "t": [1.5, 2.0], "missing": None,
                              "nested": {"n": 4}}
    assert str(tmp_path) not in path.read_text(encoding="utf-8")
    assert abandoned_temporaries(path) == []
    # a second run the same day replaces the file
    again = results.write_result("gemma3-270m", "lossless", {"ratio": 2}, ["prog"], root=tmp_path / "results")
    assert again == path and json.loads(path.read_text())["result"] == {"ratio": 2}


def test_write_result_failure_keeps_the_old_file(tmp_path):
    path = results.write_result("m", "q", {"a": 1}, ["prog"], root=tmp_path)
    before = path.read_text(encoding="utf-8")
    with pytest.raises(TypeError):
        results.write_result("m", "q", {"a": object()}, ["prog"], root=tmp_path)
    assert path.read_text(encoding="utf-8") == before and abandoned_temporaries(path) == []


@pytest.mark.parametrize("model,question", [("../x", "q"), ("m", "a/b"), ("", "q"), ("m", ".hidden")])
def test_write_result_refuses_bad_names(tmp_path, model, question):
    with pytest.raises(ValueError, match="plain name"):
        results.write_result(model, question, {}, ["prog"], root=tmp_path)


def test_write_result_refuses_a_non_mapping(tmp_path):
    with pytest.raises(TypeError, match="payload must be a mapping"):
        results.write_result("m", "q", [1, 2], ["prog"], root=tmp_path)


def test_a_run_that_outlives_a_commit_is_stamped_with_the_commit_it_started_on(tmp_path):
    """Commits landing while a benchmark runs do not change its code (loaded at the start): the stamp names the
    newest commit before the run started, and the HEAD it wrote under beside it."""
    def git(*args, when=None):
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        if when is not None:
            env.update(GIT_AUTHOR_DATE=f"@{when} +0000", GIT_COMMITTER_DATE=f"@{when} +0000")
        done = subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    git("init", "-q")
    commits = []
    for i, when in enumerate((1_000_000, 2_000_000)):
        (tmp_path / "f.txt").write_text(str(i))
        git("add", "f.txt")
        git("commit", "-q", "-m", str(i), when=when)
        commits.append(git("rev-parse", "HEAD"))
    during = results._commit(tmp_path, started=1_500_000)
    assert during == {"commit": commits[0], "dirty": False, "head_at_write": commits[1]}
    assert results._commit(tmp_path, started=2_500_000) == {"commit": commits[1], "dirty": False}


def test_scrub_a_named_classifier_directory_and_the_paths_in_its_config():
    """`--classifier NAME=DIR` names the classifier, not its directory, and the recorded config keeps no machine
    path (its `base_model_name_or_path` included)."""
    args, configs = results.scrub_argv(["prog", "--classifier", "drafting=/srv/x/clf", "other=/srv/y/clf2"],
                                       {"/srv/x/clf": {"base_model_name_or_path": "/srv/models/gemma", "k": 1}})
    assert args == ["prog", "--classifier", "drafting=<classifier:0>", "other=<path>/clf2"]
    assert configs == [{"base_model_name_or_path": "<path>/gemma", "k": 1}]
