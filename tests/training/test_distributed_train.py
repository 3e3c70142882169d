"""Training sharded over two CPU processes (gloo) equals the one-process run: `train_and_calibrate` with a
`TrainingConfig` (tables row for row, the same classifier on every process) and `adainfer train` under
`accelerate launch` (the artifact and tables byte for byte, written once, by the main process only), and
`adainfer collect` the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed_collect import assert_tables_equal
from tiny_models import save_tiny_checkpoint, task_tokenizer, tiny_pair, tiny_prompts

import adainfer_hf
from adainfer_hf.artifact.constants import CLASSIFIER_CONFIG_NAME, CLASSIFIER_GATE_NAME, CLASSIFIER_SAFE_NAME
from adainfer_hf.cli import main as cli
from adainfer_hf.training.config import (
    CalibrationConfig,
    DraftingConfig,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from adainfer_hf.training.cost_model import CostModel
from adainfer_hf.training.table import FeatureTable
from adainfer_hf.training.train import train_and_calibrate

TESTS = Path(__file__).resolve().parents[1]
# The prompt path with a fixed check cost (a schedule), the drafting objective under a fixed cost model (the
# rule it records), and the generation path with a gate and free-running calibration (the
# ladder on the main process, the generations shared).
CONFIGS = {
    "prompts": TrainingConfig(method="logistic", batch_size=4, schedule=ScheduleConfig(check_cost=0.25),
                              calibration=CalibrationConfig(target_agreement=0.6, delta=0.3, min_layers=(1, 2))),
    "drafting": TrainingConfig(method="logistic", batch_size=2,
                               generation=GenerationCalibrationConfig(generation_tokens=4, first_layer=2),
                               drafting=DraftingConfig(max_draft_tokens=(1, 2), thresholds=3)),
    "free_running": TrainingConfig(
        method="logistic", batch_size=2, gate=GateConfig(kind="linear", recall=0.9),
        schedule=ScheduleConfig(check_cost=None),
        calibration=CalibrationConfig(target_agreement=0.5, delta=0.5, knob="gate"),
        generation=GenerationCalibrationConfig(generation_tokens=3, first_layer=2, free_running_tokens=3)),
}

_API_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from tiny_models import task_tokenizer, tiny_pair, tiny_prompts
    from adainfer_hf.training.config import TrainingConfig
    from adainfer_hf.training.cost_model import CostModel
    from adainfer_hf.training.train import train_and_calibrate
    dist.init_process_group("gloo")
    out, rank = Path(sys.argv[1]), dist.get_rank()
    cost = CostModel.from_dict(json.loads(sys.argv[4]))
    for name, config in json.loads(sys.argv[3]).items():
        _, ada = tiny_pair("llama")
        config = TrainingConfig.from_dict(config)
        clf, train, calib = train_and_calibrate(ada, task_tokenizer(), tiny_prompts(), config, progress=False,
                                                cost_model=cost if config.drafting else None)
        clf.save_pretrained(out / f"{name}-clf-{rank}")  # every process holds the main process's classifier
        if rank == 0:
            train.save(out / f"{name}-train.npz")
            calib.save(out / f"{name}-calibration.npz")
        else:  # the other processes handed their batches over and keep no table
            assert train is None and calib is None
    dist.destroy_process_group()
""")

# `adainfer train` as `accelerate launch` starts it, with every file this process moves into place (atomic writes
# rename) or opens for writing recorded, to show which process wrote what.
_CLI_WORKER = textwrap.dedent("""
    import builtins, json, os, sys
    from pathlib import Path
    writes, real_replace, real_rename, real_open = [], os.replace, os.rename, builtins.open
    def replace(src, dst, *a, **k):
        writes.append(str(dst))
        return real_replace(src, dst, *a, **k)
    def rename(src, dst, *a, **k):
        writes.append(str(dst))
        return real_rename(src, dst, *a, **k)
    def opened(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and str(file) != os.devnull:
            writes.append(str(file))
        return real_open(file, mode, *a, **k)
    os.replace, os.rename, builtins.open = replace, rename, opened
    from adainfer_hf.cli.main import main
    commands, status = " ".join(sys.argv[2:]).split(" :: "), 0
    for command in commands:  # several commands in one launch, separated by '::'
        status = status or main(command.split(" "))
    real_open(Path(sys.argv[1]) / f"writes-{os.environ['RANK']}.json", "w").write(json.dumps(writes))
    sys.exit(status)
""")


@pytest.fixture
def one_thread():
    """The one-process reference on one torch thread, as each worker runs (OMP_NUM_THREADS=1): another thread
    count may sum some products in another order, a last-bit difference that is not the sharding's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cost_model(num_layers: int) -> CostModel:
    """A fixed cost model (a layer or the head on n positions: 1 + 0.1 (n - 1) of one), so that the drafting search
    is the same on every run."""
    grow = tuple(1 + 0.1 * i for i in range(3))
    return CostModel(num_layers=num_layers, layer_seconds=grow, head_seconds=tuple(2 * g for g in grow),
                     lens_seconds={"full": 0.2}, gate_seconds=0.0, loop_fixed_seconds=0.0,
                     stock_step_seconds=num_layers + 2.0)


def _env():
    # The workers import this checkout's package, whatever is installed.
    src = str(Path(adainfer_hf.__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_train_and_calibrate_on_two_processes_equals_one(tmp_path, one_thread):
    script = tmp_path / "worker.py"
    script.write_text(_API_WORKER, encoding="utf-8")
    configs = json.dumps({name: config.to_dict() for name, config in CONFIGS.items()})
    cost = _cost_model(tiny_pair("llama")[1].config.num_hidden_layers)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path), str(TESTS), configs, json.dumps(cost.to_dict())]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, config in CONFIGS.items():
        _, ada = tiny_pair("llama")
        clf, train, calib = train_and_calibrate(ada, task_tokenizer(), tiny_prompts(), config, progress=False,
                                                cost_model=cost if config.drafting else None)
        assert len(train.layer) > 0 and len(calib.layer) > 0  # not vacuous
        for part, table in (("train", train), ("calibration", calib)):
            table.save(tmp_path / f"{name}-single-{part}.npz")  # through the same file format
            assert_tables_equal(FeatureTable.load(tmp_path / f"{name}-{part}.npz"),
                                FeatureTable.load(tmp_path / f"{name}-single-{part}.npz"))
        clf.save_pretrained(tmp_path / f"{name}-single")
        single = _files(tmp_path / f"{name}-single")
        assert _files(tmp_path / f"{name}-clf-0") == single, name
        # The other process's classifier came through a pickle: its joblib bytes (and so the manifest) may differ
        # in pickle layout, but the config and the pickle-free estimator encoding are the main process's.
        other = _files(tmp_path / f"{name}-clf-1")
        assert other.keys() == single.keys() and CLASSIFIER_SAFE_NAME in single, name
        for file in (CLASSIFIER_CONFIG_NAME, CLASSIFIER_SAFE_NAME, *([CLASSIFIER_GATE_NAME] * (CLASSIFIER_GATE_NAME in single))):
            assert other[file] == single[file], (name, file)
        recorded = json.loads(single[CLASSIFIER_CONFIG_NAME])["calibration"]
        assert recorded["training_config"] == config.to_dict()
        if config.drafting:  # the search ran on the main process, under the given cost model, and chose a rule
            assert recorded["cost_model"] == cost.to_dict() and recorded["drafting"]["rule"]["check_layers"]
    assert "free_running" in recorded  # the generations were run and tested


def _train_args(root: Path, out: Path) -> list[str]:
    return ["train", "--model", str(root / "model"), "--builtin-task", "capitalize", "first_of_list", "--shots", "0",
            "2", "--limit", "6", "--batch-size", "2", "--method", "logistic", "--target-agreement", "0.6",
            "--delta", "0.3", "--min-layers", "1", "2", "--check-cost", "0.25", "--gate-cost", "0.01",
            "--tables-out", str(out / "tables"), "--out", str(out / "clf")]


def _collect_args(root: Path, out: Path) -> list[str]:
    return ["collect", "--model", str(root / "model"), "--builtin-task", "next_number", "--limit", "5",
            "--batch-size", "2", "--quiet", "--out", str(out / "collected.npz")]


def test_adainfer_train_and_collect_under_accelerate_launch_write_once(tmp_path, capsys, one_thread):
    save_tiny_checkpoint(tmp_path / "model")
    assert cli.main(_train_args(tmp_path, tmp_path / "single")) == 0
    assert cli.main(_collect_args(tmp_path, tmp_path / "single")) == 0
    assert capsys.readouterr().out.count("saved the exit classifier") == 1
    script = tmp_path / "worker.py"
    script.write_text(_CLI_WORKER, encoding="utf-8")
    # `--multi_gpu` makes accelerate start the processes with torchrun; without GPUs they join over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path),
           *_train_args(tmp_path, tmp_path / "multi"), "::", *_collect_args(tmp_path, tmp_path / "multi")]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved the exit classifier") == 1, proc.stdout
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert _files(multi / "clf") == _files(single / "clf")  # the artifact, byte for byte
    for part in ("train", "calibration"):
        assert_tables_equal(FeatureTable.load(multi / "tables" / f"{part}.npz"),
                            FeatureTable.load(single / "tables" / f"{part}.npz"))
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # `adainfer collect`'s table, once
    assert_tables_equal(FeatureTable.load(multi / "collected.npz"), FeatureTable.load(single / "collected.npz"))
    main_writes = json.loads((tmp_path / "writes-0.json").read_text())
    assert any(Path(w).parent == multi / "clf" for w in main_writes), main_writes
    assert json.loads((tmp_path / "writes-1.json").read_text()) == []  # the other process wrote nothing
