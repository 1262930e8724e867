#!/bin/sh
# Run each libFuzzer target for a bounded time on a working copy of its seed corpus, then print one line per
# target: executions, executions per second, corpus size, and whether it found anything.
#   sh tests/fuzz/run.sh DIR SECONDS TARGET...   (DIR holds fuzz_<target>, as `make fuzz` builds them)
# A finding leaves its input in DIR/artifacts/<target>/ and makes the run exit 1 after every target has run;
# copy the input into tests/fuzz/<target>/ with the fix, as the regression seed.
set -u
dir=$1
seconds=$2
shift 2
here=$(dirname "$0")
failed=""
summary=""
for t in "$@"; do
	corpus=$dir/corpus/$t
	art=$dir/artifacts/$t
	log=$dir/$t.log
	mkdir -p "$corpus" "$art"
	# the seeds first, so each run starts from real-shaped inputs and keeps what earlier runs found
	[ -d "$here/$t" ] && cp -n "$here/$t"/* "$corpus"/ 2>/dev/null
	dict=""
	[ -f "$here/$t.dict" ] && dict="-dict=$here/$t.dict"
	echo "== fuzz_$t for ${seconds}s"
	# -timeout: one input running 10 s is a hang worth reporting; -rss_limit_mb: a parser's memory is bounded
	# shellcheck disable=SC2086
	"$dir/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
	    -artifact_prefix="$art/" $dict "$corpus" >"$log" 2>&1
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
	units=$(find "$corpus" -type f | wc -l)
	if [ "$rc" -eq 0 ]; then
		verdict="no finding"
	else
		verdict="FINDING (exit $rc; see $log and $art/)"
		failed="$failed $t"
		grep -m 3 -E 'ERROR: |SUMMARY: |runtime error' "$log" | sed 's/^/   /'
	fi
	line=$(printf '%-8s %12s execs %8s/s %6s corpus  %s' "$t" "${execs:-?}" "${rate:-?}" "$units" "$verdict")
	echo "$line"
	summary="$summary$line
"
done
echo "== fuzz summary (${seconds}s per target)"
printf '%s' "$summary"
if [ -n "$failed" ]; then
	echo "== findings in:$failed" >&2
	exit 1
fi
