#!/usr/bin/env bash
# Paper-style evaluation of AdaInfer on one of the real checkpoints of benchmarks/common/real_models.py, CPU-sized
# (the protocol of eval_smollm2.sh):
# 1. `adainfer train` on ten function-vectors tasks that are NOT evaluated (inter-task: nothing of the evaluated
#    tasks is seen in training or calibration); TRAIN_LIMIT examples per task, CAL_FRACTION of them held out for
#    Learn-then-Test calibration at 0.99; the feature tables are saved, and a second classifier is calibrated at
#    0.95 from the same tables (`--from-tables`), so both targets share one training set.
# 2. `adainfer eval` with the 0.99 classifier: dense, adainfer, the paper's gap>0.8 rule, a live CRF, ShortGPT and
#    the oracle, 5-shot, on four unseen tasks; writes $OUT/results.json, results.md and plots.
# 3. `adainfer eval` with the 0.95 classifier (dense and adainfer only): $OUT-0.95/.
# OUT defaults to docs/results/KEY/eval/<UTC date>, the layout benchmarks.paper.paper_table and
# scripts/docs_tables.py read (the newest <date>/ and <date>-0.95/).
#
# Usage: benchmarks/paper/eval_real.sh KEY [OUT_DIR]   KEY: qwen2.5-0.5b | gemma3-270m | qwen2.5-1.5b | smollm2
set -euo pipefail
PY=${PYTHON:-python}
KEY=${1:?usage: eval_real.sh KEY [OUT_DIR]}
OUT=${2:-docs/results/$KEY/eval/$(date -u +%F)}
FV=${FV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/data/function_vectors}
LIMIT=${LIMIT:-16}
CAL_LIMIT=${CAL_LIMIT:-8}
TRAIN_LIMIT=${TRAIN_LIMIT:-80}
CAL_FRACTION=${CAL_FRACTION:-0.6}
CHECK_LENGTH=${CHECK_LENGTH:-128}
MODEL=$($PY -m benchmarks.common.real_models "$KEY" 2>/dev/null | tr "\t" "\n" | sed -n "s/^dir=//p")
ROOT=${CLF_ROOT:-${ADAINFER_HOME:-$HOME/.cache/adainfer_hf}/eval/$KEY-svm-10tasks-$TRAIN_LIMIT}
mkdir -p "$OUT" "$OUT-0.95"

if [ ! -f "$ROOT/clf-0.99/exit_classifier_config.json" ]; then
  $PY -m adainfer_hf train --model "$MODEL" --method svm --shots 5 --limit "$TRAIN_LIMIT" --seed 0 --quiet \
    --target-agreement 0.99 --calibration-fraction "$CAL_FRACTION" --check-length "$CHECK_LENGTH" \
    --tables-out "$ROOT/tables" --out "$ROOT/clf-0.99" \
    --task-file "$FV/abstractive/present-past.json" "$FV/abstractive/singular-plural.json" \
      "$FV/abstractive/english-french.json" "$FV/abstractive/english-german.json" \
      "$FV/abstractive/landmark-country.json" "$FV/abstractive/person-sport.json" \
      "$FV/abstractive/product-company.json" "$FV/abstractive/park-country.json" \
      "$FV/abstractive/person-occupation.json" "$FV/extractive/choose_last_of_5.json"
fi
if [ ! -f "$ROOT/clf-0.95/exit_classifier_config.json" ]; then
  $PY -m adainfer_hf train --model "$MODEL" --method svm --seed 0 --quiet --from-tables "$ROOT/tables" \
    --target-agreement 0.95 --check-length "$CHECK_LENGTH" --out "$ROOT/clf-0.95"
fi

EVAL_TASKS=("$FV/abstractive/sentiment.json" "$FV/abstractive/antonym.json" \
  "$FV/abstractive/country-capital.json" "$FV/abstractive/capitalize.json")
$PY -m adainfer_hf.cli.eval eval --model "$MODEL" --exit-classifier "$ROOT/clf-0.99" --task-file "${EVAL_TASKS[@]}" \
  --shots 5 --limit "$LIMIT" --calibration-limit "$CAL_LIMIT" \
  --methods dense,adainfer,gap,crf,shortgpt,oracle --max-new-tokens 5 --batch-size 8 --seed 0 --quiet \
  --out "$OUT/results.json" --report-dir "$OUT"
$PY -m adainfer_hf.cli.eval eval --model "$MODEL" --exit-classifier "$ROOT/clf-0.95" --task-file "${EVAL_TASKS[@]}" \
  --shots 5 --limit "$LIMIT" --calibration-limit "$CAL_LIMIT" --sweep-targets \
  --methods dense,adainfer --max-new-tokens 5 --batch-size 8 --seed 0 --quiet \
  --out "$OUT-0.95/results.json" --report-dir "$OUT-0.95"
