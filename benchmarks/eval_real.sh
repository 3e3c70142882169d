#!/usr/bin/env bash
# Paper-style evaluation of AdaInfer on one of the real checkpoints of benchmarks/real_models.py, CPU-sized
# (the same protocol as eval_smollm2.sh, fewer prompts):
# 1. `adainfer train` on six OTHER function-vectors tasks (inter-task: nothing of the evaluated tasks is seen in
#    training or calibration), calibrated at TARGET (default 0.99; the report's calibration sweep adds 0.95, ...).
# 2. `adainfer eval`: dense, adainfer, the paper's gap>0.8 rule, a live CRF, ShortGPT and the oracle, 5-shot, on
#    four tasks; writes docs/results/<key>/ (results.json, results.md, plots).
#
# Usage: benchmarks/eval_real.sh KEY [OUT_DIR]   KEY: qwen2.5-0.5b | gemma3-270m | qwen2.5-1.5b | smollm2
set -euo pipefail
PY=${PYTHON:-python}
KEY=${1:?usage: eval_real.sh KEY [OUT_DIR]}
OUT=${2:-docs/results/$KEY}
FV=${FV:-/work/shared/data/function_vectors}
LIMIT=${LIMIT:-8}
CAL_LIMIT=${CAL_LIMIT:-4}
TRAIN_LIMIT=${TRAIN_LIMIT:-12}
TARGET=${TARGET:-0.99}
MODEL=$($PY "$(dirname "$0")/real_models.py" "$KEY" 2>/dev/null | tr "\t" "\n" | sed -n "s/^dir=//p")
CLF=${CLF:-${ADAINFER_HOME:-$HOME/.cache/adainfer_hf}/eval/$KEY-svm-6tasks-$TARGET}
mkdir -p "$OUT"

if [ ! -f "$CLF/exit_classifier_config.json" ]; then
  $PY -m adainfer_hf train --model "$MODEL" --method svm --shots 5 --limit "$TRAIN_LIMIT" --seed 0 --quiet \
    --target-agreement "$TARGET" --out "$CLF" \
    --task-file "$FV/abstractive/present-past.json" "$FV/abstractive/singular-plural.json" \
      "$FV/abstractive/english-french.json" "$FV/abstractive/landmark-country.json" \
      "$FV/abstractive/person-sport.json" "$FV/extractive/choose_last_of_5.json"
fi

$PY -m adainfer_hf.cli.eval eval --model "$MODEL" --exit-classifier "$CLF" \
  --task-file "$FV/abstractive/sentiment.json" "$FV/abstractive/antonym.json" \
    "$FV/abstractive/country-capital.json" "$FV/abstractive/capitalize.json" \
  --shots 5 --limit "$LIMIT" --calibration-limit "$CAL_LIMIT" \
  --methods dense,adainfer,gap,crf,shortgpt,oracle --max-new-tokens 5 --batch-size 8 --seed 0 --quiet \
  --out "$OUT/results.json" --report-dir "$OUT"
