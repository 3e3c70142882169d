"""lm-eval under data parallelism (two CPU processes over gloo) reports the whole run: the exit statistics in the
table and the sidecar equal the one-process run's, task by task (requests, decisions, histogram, mean layer,
FLOPs ratio)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval (the 'eval' extra) is installed only in the 'newest' CI environment")

from test_lm_eval_harness import workspace  # noqa: E402, F401 - the tiny model and tasks, as a fixture

import adainfer_hf  # noqa: E402
from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule  # noqa: E402
from adainfer_hf.integrations import lm_eval as harness  # noqa: E402

# The harness turns on data parallelism only with several GPUs (HFLM sets rank and world size from accelerate
# when it counts more than one); on the CPU the worker gives the model what HFLM would set there, and the
# harness does the rest as on GPUs: each process builds its share of every task's requests, metrics are gathered.
_WORKER = textwrap.dedent("""
    import sys
    from adainfer_hf.integrations import lm_eval as harness
    init = harness.AdaInferLM.__init__
    def data_parallel(self, *args, **kwargs):
        init(self, *args, **kwargs)
        assert self.accelerator is not None and self.accelerator.num_processes == 2
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
    harness.AdaInferLM.__init__ = data_parallel
    sys.exit(harness.main(sys.argv[1:]))
""")

SAME = ("requests", "decisions", "num_layers", "exit_histogram", "request_types")


def _argv(space, clf_dir, out):
    return ["--model", "adainfer", "--model_args", f"pretrained={space['model']},exit_classifier={clf_dir}",
            "--device", "cpu", "--tasks", "tiny_mc,tiny_gen", "--include_path", space["tasks"], "--batch_size",
            "2", "--output_path", str(out)]


def _sidecar(out: Path) -> dict:
    (sidecar,) = out.glob(f"*/{harness.SIDECAR_PREFIX}_*.json")
    return json.loads(sidecar.read_text())


def test_two_processes_report_the_whole_run(workspace, tmp_path, capsys):  # noqa: F811
    model = AdaInferLlamaForCausalLM.from_pretrained(workspace["model"], exit_classifier=None)
    clf_dir = tmp_path / "gap_rule"  # exits that vary from request to request
    ExitClassifier(GapThresholdRule(threshold=0.1).fit(np.zeros((1, 2)))).bind(model).save_pretrained(clf_dir)
    assert harness.main(_argv(workspace, clf_dir, tmp_path / "single")) == 0
    capsys.readouterr()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    src = str(Path(adainfer_hf.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",  # accelerate joins them over gloo
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           *_argv(workspace, clf_dir, tmp_path / "multi")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("AdaInfer exit statistics") == 1, proc.stdout  # the table, once (main process)
    single, multi = _sidecar(tmp_path / "single"), _sidecar(tmp_path / "multi")
    assert single["tasks"].keys() == multi["tasks"].keys() == {"tiny_mc", "tiny_gen"}
    assert len(single["all"]["exit_histogram"]) >= 2  # exits vary: the histograms say something
    for name in (*single["tasks"], "all"):
        one = single["all"] if name == "all" else single["tasks"][name]
        two = multi["all"] if name == "all" else multi["tasks"][name]
        assert {k: two[k] for k in SAME} == {k: one[k] for k in SAME}, name
        for key in ("mean_exit_layer", "pruning_ratio", "flops_ratio"):
            assert two[key] == pytest.approx(one[key], rel=1e-12), (name, key)
    # The same figures are in the harness's results file (from the main process's get_model_info).
    (results_file,) = (tmp_path / "multi").glob("*/results_*.json")
    assert json.loads(results_file.read_text())["config"][harness.STATS_KEY]["tasks"] == multi["tasks"]
