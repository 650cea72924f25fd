#!/usr/bin/env bash
# The whole test suite: unit, session and integration tests against throwaway
# PostgreSQL clusters the harness starts and removes itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets "$@"
