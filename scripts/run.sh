#!/bin/sh
# `make run`: run sparkd in the foreground with one worker, on private servers when none is configured.
#
#   sh scripts/run.sh BIN_DIR [sparkd options...]
#
# When CELERY_BROKER_URL is set neither in the environment nor in the env file, a private redis-server is started
# under the project directory ($SPARK_RUN_DIR, default .run/) on 127.0.0.1:$SPARK_RUN_REDIS_PORT (default 6390),
# and reused while it runs. When DATABASE_URL is unset the same is done for PostgreSQL on port
# $SPARK_RUN_PG_PORT (default 5439; run as the postgres user, since initdb refuses root), and the migrations are
# applied. The servers keep running after sparkd exits; stop them with `sh scripts/run.sh --stop-servers`.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${SPARK_RUN_DIR:-$ROOT/.run}
REDIS_PORT=${SPARK_RUN_REDIS_PORT:-6390}
PG_PORT=${SPARK_RUN_PG_PORT:-5439}

say() { echo "run.sh: $*" >&2; }
die() { say "$*"; exit 1; }

as_postgres() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

pg_bindir() {
	for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
		[ -x "$d/initdb" ] && { echo "$d"; return 0; }
	done
	return 1
}

stop_servers() {
	if [ -f "$RUN/redis/redis.pid" ]; then
		kill "$(cat "$RUN/redis/redis.pid")" 2>/dev/null && say "stopped the private Redis" || true
	fi
	if [ -f "$RUN/pg/data/PG_VERSION" ] && B=$(pg_bindir); then
		as_postgres "$B/pg_ctl" -D "$RUN/pg/data" -m fast -w stop >/dev/null 2>&1 &&
		    say "stopped the private PostgreSQL" || true
	fi
}

if [ "${1-}" = "--stop-servers" ]; then
	stop_servers
	exit 0
fi

BIN=${1:?usage: run.sh BIN_DIR [sparkd options...]}
shift
[ -x "$BIN/sparkd" ] || die "$BIN/sparkd not found: run make first"

mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)

# The env file sparkd will read: --env-file is not looked at here; $SPARK_ENV_FILE ("" = none), else ./.env.
if [ "${SPARK_ENV_FILE+set}" = set ]; then
	ENV_FILE=$SPARK_ENV_FILE
elif [ -f .env ]; then
	ENV_FILE=.env
else
	ENV_FILE=
fi

# is_set VAR...: true when any VAR is set (non-empty) in the environment or assigned in the env file
is_set() {
	for v in "$@"; do
		eval "val=\${$v-}"
		[ -n "$val" ] && return 0
		if [ -n "$ENV_FILE" ] && [ -r "$ENV_FILE" ] &&
		    grep -Eq "^[[:space:]]*(export[[:space:]]+)?$v[[:space:]]*=" "$ENV_FILE"; then
			return 0
		fi
	done
	return 1
}

start_redis() {
	d=$RUN/redis
	mkdir -p "$d"
	if [ -f "$d/redis.pid" ] && kill -0 "$(cat "$d/redis.pid")" 2>/dev/null &&
	    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
		say "reusing the private Redis on 127.0.0.1:$REDIS_PORT"
	else
		command -v redis-server >/dev/null || die "redis-server is not installed (make deps)"
		rm -f "$d/redis.pid"
		redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$d" \
		    --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" ||
		    die "redis-server did not start (see $d/redis.log)"
		i=0
		until redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; do
			i=$((i + 1))
			[ $i -lt 100 ] || die "the private Redis did not answer on port $REDIS_PORT (see $d/redis.log)"
			sleep 0.1
		done
		say "started a private Redis on 127.0.0.1:$REDIS_PORT (data in $d)"
	fi
	export CELERY_BROKER_URL="redis://127.0.0.1:$REDIS_PORT/0"
	is_set CELERY_RESULT_BACKEND AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND ||
	    export CELERY_RESULT_BACKEND="redis://127.0.0.1:$REDIS_PORT/0"
}

start_postgres() {
	d=$RUN/pg
	B=$(pg_bindir) || die "PostgreSQL is not installed (make deps), or set DATABASE_URL"
	mkdir -p "$d"
	if [ "$(id -u)" -eq 0 ]; then
		chown postgres:postgres "$d"
		chmod 0700 "$d"
		runuser -u postgres -- test -w "$d" ||
		    die "the postgres user cannot reach $d: set SPARK_RUN_DIR to a directory it can reach, or DATABASE_URL"
	fi
	if [ ! -f "$d/data/PG_VERSION" ]; then
		as_postgres "$B/initdb" -D "$d/data" -A trust -U postgres -E UTF8 >"$d/initdb.log" 2>&1 ||
		    die "initdb failed (see $d/initdb.log)"
	fi
	if as_postgres "$B/pg_ctl" -D "$d/data" status >/dev/null 2>&1; then
		say "reusing the private PostgreSQL on 127.0.0.1:$PG_PORT"
	else
		as_postgres "$B/pg_ctl" -D "$d/data" -l "$d/postgres.log" -w -t 60 \
		    -o "-k $d -c listen_addresses=127.0.0.1 -p $PG_PORT" start >/dev/null ||
		    die "PostgreSQL did not start (see $d/postgres.log)"
		say "started a private PostgreSQL on 127.0.0.1:$PG_PORT (data in $d/data)"
	fi
	if ! as_postgres "$B/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
	    "SELECT 1 FROM pg_database WHERE datname = 'spark'" | grep -q 1; then
		as_postgres "$B/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres spark ||
		    die "could not create the database spark"
	fi
	export DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/spark"
	if ! "$BIN/spark-worker" --migrate; then
		say "warning: spark-worker --migrate failed; workflow tasks may not find their tables"
	fi
}

is_set CELERY_BROKER_URL AUTOMAGIK_SPARK_CELERY_BROKER_URL || start_redis
is_set DATABASE_URL AUTOMAGIK_SPARK_DATABASE_URL || start_postgres

is_set SPARK_SOCKET || export SPARK_SOCKET="$RUN/sparkd.sock"
is_set SPARK_LOG_DIR || export SPARK_LOG_DIR="$RUN/log"

case "$BIN" in
"$ROOT"/*) CTL=${BIN#"$ROOT"/}/sparkctl ;;
*) CTL=$BIN/sparkctl ;;
esac
SOCK=${SPARK_SOCKET:-}
case "$SOCK" in
"$ROOT"/*) SOCK=${SOCK#"$ROOT"/} ;;
esac
if [ -n "$SOCK" ]; then
	say "sparkd in the foreground (Ctrl-C stops it). From a second terminal: $CTL --socket $SOCK status" \
	    "(or export SPARK_SOCKET=$SOCK)"
else
	say "sparkd in the foreground (Ctrl-C stops it). From a second terminal: $CTL status"
fi
exec "$BIN/sparkd" --workers 1 "$@"
