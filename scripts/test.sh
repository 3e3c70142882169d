#!/usr/bin/env bash
# The test suite (what CI runs): install if needed, lint, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ruff check src tests benchmarks examples
exec python -m pytest -q -p no:cacheprovider "$@"
