"""Collection sharded over two CPU processes (gloo, started by torchrun) equals the one-process run, row for row."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from tiny_models import task_tokenizer, tiny_pair, tiny_prompts

import adainfer_hf
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.collect_generation import collect_generation_features
from adainfer_hf.training.table import FeatureTable

_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from tiny_models import task_tokenizer, tiny_pair, tiny_prompts
    from adainfer_hf.training.collect import collect_features
    from adainfer_hf.training.collect_generation import collect_generation_features
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    _, ada = tiny_pair("llama")
    tok, prompts = task_tokenizer(), tiny_prompts()
    t = collect_features(ada, tok, prompts, batch_size=4, progress=False, hidden_states=True, distributed=True)
    g = collect_generation_features(ada, tok, prompts[:7], new_tokens=3, batch_size=2, progress=False,
                                    distributed=True)
    if dist.get_rank() == 0:
        t.save(out / "prompts.npz")
        g.save(out / "generations.npz")
    else:  # the other processes hand their batches over and keep nothing
        assert t is None and g is None
    dist.destroy_process_group()
""")


def assert_tables_equal(a: FeatureTable, b: FeatureTable) -> None:
    for f in dataclasses.fields(FeatureTable):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        elif f.name != "meta":
            assert x == y, f.name


def test_two_processes_equal_one(tmp_path):
    _, ada = tiny_pair("llama")
    tok, prompts = task_tokenizer(), tiny_prompts()
    single = collect_features(ada, tok, prompts, batch_size=4, progress=False, hidden_states=True)
    single_gen = collect_generation_features(ada, tok, prompts[:7], new_tokens=3, batch_size=2, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    # The workers import this checkout's package, whatever is installed.
    src = str(Path(adainfer_hf.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path), str(Path(__file__).resolve().parents[1])]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = FeatureTable.load(tmp_path / "prompts.npz")
    multi_gen = FeatureTable.load(tmp_path / "generations.npz")
    assert len(single.layer) > 0 and len(single_gen.layer) > 0  # not vacuous
    assert_tables_equal(multi, FeatureTable.load(_roundtrip(single, tmp_path / "s.npz")))
    assert_tables_equal(multi_gen, FeatureTable.load(_roundtrip(single_gen, tmp_path / "g.npz")))


def _roundtrip(table: FeatureTable, path: Path) -> Path:
    """The one-process table through the same file format the workers wrote."""
    table.save(path)
    return path
