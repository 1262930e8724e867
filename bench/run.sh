#!/bin/sh
# make bench: every benchmark (bench/bench.py), results into bench/results.md; extra arguments pass through
# (make bench BENCH_ARGS=--quick). BENCH_RUNS and BENCH_TASKS still set the runs and the no-op drain's size.
set -eu
BIN=${1:?usage: bench/run.sh BIN_DIR [bench.py options]}
shift
cd "$(dirname "$0")/.."
exec /usr/bin/python3 bench/bench.py "$BIN" ${BENCH_RUNS:+--runs "$BENCH_RUNS"} \
	${BENCH_TASKS:+--drain-tasks "$BENCH_TASKS"} "$@"
