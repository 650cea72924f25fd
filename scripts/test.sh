#!/usr/bin/env bash
# The whole test suite: unit, session and integration tests against throwaway
# PostgreSQL clusters the harness starts and removes itself. With arguments, they go to
# `cargo test` instead of --all-targets (scripts/test.sh --test masking: one file).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if [ $# -eq 0 ]; then
  set -- --all-targets
fi
cargo test "$@"
