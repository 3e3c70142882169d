#!/usr/bin/env bash
# The test suite (what CI runs): lint, then the whole pytest suite once per supported transformers release: the
# newest and the lowest we accept (two environments, installed on first use). Extra arguments go to pytest.
# ADAINFER_TEST_ENVS="newest" runs one environment only (quicker while developing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
status=0
lint=1
for env_name in ${ADAINFER_TEST_ENVS:-newest lowest}; do
  # (`set -e` does not apply inside a subshell tested by `||`: every step checks its own status)
  (
    export ADAINFER_ENV="$env_name"
    source "$root/scripts/setup_env.sh" || exit $?
    if [ "$lint" = 1 ]; then
      ruff check src tests benchmarks examples || exit $?
    fi
    echo "=== pytest, '$env_name' environment: $(python -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)')"
    python -m pytest -q -p no:cacheprovider "$@"
  ) || status=$?
  lint=0
done
exit "$status"
