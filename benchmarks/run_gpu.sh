#!/usr/bin/env bash
# The one-call GPU check (build, GPU tests, bench, profile; under 9 minutes), results into $OUT:
# fastgan/perf/gpu_check.py's docstring has its stages and time budgets.   OUT=/tmp/gpu benchmarks/run_gpu.sh
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m fastgan.perf.gpu_check --out "${OUT:?set OUT to a folder}" "$@"
