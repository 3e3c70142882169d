"""Training an exit classifier: feature collection, the feature table, training, calibration, check schedules.

The research helpers behind `adainfer_hf.train_and_calibrate`, importable from here:

```python
from adainfer_hf.training import FeatureTable, calibrate, collect_features, schedule_classifier, train_exit_classifier
```

`TrainingConfig` (with `CalibrationConfig`, `GateConfig`, `ScheduleConfig`, `GenerationCalibrationConfig`,
`DraftingConfig`) holds
the settings of `train_and_calibrate` and `train_on_tables`.
"""

from .calibrate import calibrate, exit_scores, simulate_exits, summarize_exits
from .check_cost import measure_check_cost
from .collect import RecordingPolicy, collect_features
from .collect_generation import collect_generation_features
from .config import (
    CalibrationConfig,
    DraftingConfig,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from .cost_model import CostModel, measure_cost_model
from .drafting import DraftRule, DraftSimulation, choose_drafting_rule, simulate_drafting
from .draws import calibration_draws_needed
from .free_running import FreeRunning, calibrate_free_running, candidate_ladder, prefix_losses
from .schedule import ScheduleChoice, choose_schedule, resolve_check_costs, schedule_classifier, schedule_cost
from .table import LABEL_KINDS, FeatureTable, table_sequences
from .train import TRAIN_METHODS, train_and_calibrate, train_exit_classifier, train_on_tables

__all__ = [
    "LABEL_KINDS",
    "TRAIN_METHODS",
    "CalibrationConfig",
    "CostModel",
    "DraftRule",
    "DraftSimulation",
    "DraftingConfig",
    "FeatureTable",
    "FreeRunning",
    "GateConfig",
    "GenerationCalibrationConfig",
    "RecordingPolicy",
    "ScheduleChoice",
    "ScheduleConfig",
    "TrainingConfig",
    "calibrate",
    "calibrate_free_running",
    "calibration_draws_needed",
    "candidate_ladder",
    "choose_drafting_rule",
    "choose_schedule",
    "collect_features",
    "collect_generation_features",
    "exit_scores",
    "measure_check_cost",
    "measure_cost_model",
    "prefix_losses",
    "resolve_check_costs",
    "schedule_classifier",
    "schedule_cost",
    "simulate_drafting",
    "simulate_exits",
    "summarize_exits",
    "table_sequences",
    "train_and_calibrate",
    "train_exit_classifier",
    "train_on_tables",
]
