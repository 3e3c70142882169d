#!/usr/bin/env bash
# The main job on a fresh machine: install, convert the embedded SmolLM2-135M-Instruct once, and show a forward
# with early exit and the exit layers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec adainfer demo "$@"
