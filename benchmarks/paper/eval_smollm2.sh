#!/usr/bin/env bash
# Paper-style evaluation of AdaInfer on the embedded SmolLM2-135M-Instruct (30 layers), CPU-sized.
#
# 1. Trains the exit classifier with `adainfer train` on six OTHER function-vectors tasks (inter-task setting:
#    nothing of the evaluated tasks is seen in training or calibration of the classifier).
# 2. Evaluates dense, adainfer, the paper's gap>0.8 rule, a live CRF, ShortGPT and the oracle on six tasks,
#    0-shot and 5-shot, and writes docs/results/smollm2/eval/<UTC date>/ (results.json, results.md, PNG plots).
#
# Usage: benchmarks/paper/eval_smollm2.sh [OUT_DIR]   (default docs/results/smollm2/eval/<UTC date>; about 16 min wall, 17 CPU-min, on 2 shared cores)
# Multi-process / multi-GPU: replace `python -m adainfer_hf.cli.eval` by
#   `accelerate launch --multi_gpu --num_processes N -m adainfer_hf.cli.eval` (same flags, same results.json;
#   without GPUs the processes join over gloo on the CPU).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${1:-docs/results/smollm2/eval/$(date -u +%F)}
mkdir -p "$OUT"
FV=${FV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/data/function_vectors}
LIMIT=${LIMIT:-12}
CAL_LIMIT=${CAL_LIMIT:-6}
CLF=${CLF:-${ADAINFER_HOME:-$HOME/.cache/adainfer_hf}/eval/smollm2-svm-6tasks}

if [ ! -f "$CLF/exit_classifier_config.json" ]; then
  $PY -m adainfer_hf train --model default --method svm --shots 0 5 --limit 12 --seed 0 --quiet --out "$CLF" \
    --task-file "$FV/abstractive/present-past.json" "$FV/abstractive/singular-plural.json" \
      "$FV/abstractive/english-french.json" "$FV/abstractive/landmark-country.json" \
      "$FV/abstractive/person-sport.json" "$FV/extractive/choose_last_of_5.json"
fi

$PY -m adainfer_hf.cli.eval eval --model default --exit-classifier "$CLF" \
  --task-file "$FV/abstractive/sentiment.json" "$FV/abstractive/ag_news.json" "$FV/abstractive/capitalize.json" \
    "$FV/abstractive/country-capital.json" "$FV/extractive/choose_first_of_5.json" "$FV/abstractive/antonym.json" \
  --shots 0 5 --limit "$LIMIT" --calibration-limit "$CAL_LIMIT" \
  --methods dense,adainfer,gap,crf,shortgpt,oracle --max-new-tokens 5 --batch-size 8 --seed 0 --quiet \
  --out "$OUT/results.json" --report-dir "$OUT"

# Optional (STUDY=1): leave-one-task-out generalization study of the paper, written to $OUT/study_loto.md.
if [ "${STUDY:-0}" = 1 ]; then
  $PY -m adainfer_hf.cli.eval eval --model default --study loto --study-method svm --target-agreement 0.9 \
    --task-file "$FV/abstractive/sentiment.json" "$FV/abstractive/capitalize.json" \
      "$FV/extractive/choose_first_of_5.json" "$FV/abstractive/antonym.json" \
    --shots 5 --limit 16 --seed 0 --quiet --out "$OUT/study_loto.json" --report-dir "$OUT"
fi
