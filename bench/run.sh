#!/bin/sh
# make bench: the drain benchmark (bench/drain.py), results into bench/results.md for docs/benchmarks.md.
set -eu
BIN=${1:?usage: bench/run.sh BIN_DIR}
cd "$(dirname "$0")/.."
exec /usr/bin/python3 bench/drain.py "$BIN" --tasks "${BENCH_TASKS:-20000}" --runs "${BENCH_RUNS:-5}" \
	--out bench/results.md
