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
#
# Whatever answers on a port is not trusted to be ours: a private server is the one whose pid (Redis: INFO's
# process_id against our pid file) or data directory (PostgreSQL: SHOW data_directory) is ours. A default port held
# by anything else is named and the next free one is used (and remembered in the server's directory); a port given
# with SPARK_RUN_*_PORT that is held stops the run with the reason.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=${SPARK_RUN_DIR:-$ROOT/.run}
REDIS_PORT=${SPARK_RUN_REDIS_PORT:-6390}
PG_PORT=${SPARK_RUN_PG_PORT:-5439}
# how many ports past a taken default port are tried
PORT_TRIES=20

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

# find_port TRY VAR FIRST: run TRY (redis_try, pg_try) on FIRST and, unless VAR gave that port, on the next ones
# until one is ours; the port in $PICKED. A taken port is named; a given one stops the run.
find_port() {
	fp=$3
	n=0
	until "$1" "$fp"; do
		eval "given=\${$2-}"
		[ -z "$given" ] || die "port $fp ($2) is taken by $HELD: stop it, or choose a free port"
		n=$((n + 1))
		[ $n -le $PORT_TRIES ] || die "ports $3 to $fp are all taken; set $2 to a free port"
		say "port $fp is taken by $HELD: trying $((fp + 1))"
		fp=$((fp + 1))
	done
	PICKED=$fp
}

# redis_pid PORT: the process_id of the Redis answering on 127.0.0.1:PORT, empty when none answers
redis_pid() {
	# bounded: a server of another protocol may never answer
	timeout 2 redis-cli -h 127.0.0.1 -p "$1" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p'
}

# port_user PORT: who holds a TCP port on 127.0.0.1, for messages
port_user() {
	u=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*",pid=[0-9]*\).*/\1/p' | head -n 1)
	[ -n "$u" ] && echo "$u" || echo "another program"
}

# redis_try PORT: start our Redis on PORT. 0 when the server on PORT is the one we started (its process_id is our
# pid file's), 1 when PORT is taken by something else (named in $HELD), exits on other failures.
redis_try() {
	p=$1
	pid=$(redis_pid "$p")
	if [ -n "$pid" ]; then
		HELD="another Redis (pid $pid, not started by this run)"
		return 1
	fi
	rm -f "$d/redis.pid"
	: >"$d/redis.log"
	redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$d" \
	    --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" ||
	    die "redis-server did not start (see $d/redis.log)"
	i=0
	while :; do
		if [ -f "$d/redis.pid" ] && [ "$(redis_pid "$p")" = "$(cat "$d/redis.pid")" ]; then
			return 0
		fi
		if grep -q "Address already in use" "$d/redis.log" 2>/dev/null; then
			pid=$(redis_pid "$p")
			if [ -n "$pid" ]; then
				HELD="another Redis (pid $pid, not started by this run)"
			else
				HELD=$(port_user "$p")
			fi
			return 1
		fi
		i=$((i + 1))
		[ $i -lt 100 ] || die "the private Redis did not answer on port $p (see $d/redis.log)"
		sleep 0.1
	done
}

start_redis() {
	d=$RUN/redis
	mkdir -p "$d"
	# ours, still running: the pid file's process answers on the port we recorded
	p=$(cat "$d/port" 2>/dev/null || echo "$REDIS_PORT")
	if [ -f "$d/redis.pid" ] && kill -0 "$(cat "$d/redis.pid")" 2>/dev/null &&
	    [ "$(redis_pid "$p")" = "$(cat "$d/redis.pid")" ]; then
		if [ -n "${SPARK_RUN_REDIS_PORT-}" ] && [ "$p" != "$SPARK_RUN_REDIS_PORT" ]; then
			die "the private Redis already runs on port $p (pid $(cat "$d/redis.pid")), not" \
			    "$SPARK_RUN_REDIS_PORT: stop it with 'sh scripts/run.sh --stop-servers' first"
		fi
		REDIS_PORT=$p
		say "reusing the private Redis on 127.0.0.1:$REDIS_PORT (pid $(cat "$d/redis.pid"))"
	else
		command -v redis-server >/dev/null || die "redis-server is not installed (make deps)"
		find_port redis_try SPARK_RUN_REDIS_PORT "$REDIS_PORT"
		REDIS_PORT=$PICKED
		echo "$REDIS_PORT" >"$d/port"
		say "started a private Redis on 127.0.0.1:$REDIS_PORT (pid $(cat "$d/redis.pid"), data in $d)"
	fi
	export CELERY_BROKER_URL="redis://127.0.0.1:$REDIS_PORT/0"
	is_set CELERY_RESULT_BACKEND AUTOMAGIK_SPARK_CELERY_RESULT_BACKEND ||
	    export CELERY_RESULT_BACKEND="redis://127.0.0.1:$REDIS_PORT/0"
}

# pg_datadir PORT: the data directory of the PostgreSQL answering on 127.0.0.1:PORT, empty when none tells us
pg_datadir() {
	as_postgres "$B/psql" -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAc "SHOW data_directory" 2>/dev/null ||
	    true
}

# pg_try PORT: like redis_try, for our PostgreSQL: ours is the one whose data directory is $d/data.
pg_try() {
	p=$1
	if "$B/pg_isready" -q -h 127.0.0.1 -p "$p" 2>/dev/null || [ $? -eq 1 ]; then
		HELD="another PostgreSQL (data directory $(pg_datadir "$p" | sed 's/^$/unknown/'), not started by this run)"
		return 1
	fi
	if ! as_postgres "$B/pg_ctl" -D "$d/data" -l "$d/postgres.log" -w -t 60 \
	    -o "-k $d -c listen_addresses=127.0.0.1 -p $p" start >/dev/null; then
		if grep -q "could not bind\|Address already in use" "$d/postgres.log" 2>/dev/null; then
			HELD=$(port_user "$p")
			return 1
		fi
		die "PostgreSQL did not start (see $d/postgres.log)"
	fi
	return 0
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
	data=$(cd "$d/data" && pwd -P)
	if as_postgres "$B/pg_ctl" -D "$d/data" status >/dev/null 2>&1; then
		# ours runs: its port is line 4 of its postmaster.pid
		p=$(sed -n 4p "$d/data/postmaster.pid")
		if [ -n "${SPARK_RUN_PG_PORT-}" ] && [ "$p" != "$SPARK_RUN_PG_PORT" ]; then
			die "the private PostgreSQL already runs on port $p, not $SPARK_RUN_PG_PORT: stop it with" \
			    "'sh scripts/run.sh --stop-servers' first"
		fi
		PG_PORT=$p
		say "reusing the private PostgreSQL on 127.0.0.1:$PG_PORT"
	else
		find_port pg_try SPARK_RUN_PG_PORT "$PG_PORT"
		PG_PORT=$PICKED
		say "started a private PostgreSQL on 127.0.0.1:$PG_PORT (data in $d/data)"
	fi
	# the server that answers on the port must be the one whose data directory is ours
	[ "$(pg_datadir "$PG_PORT")" = "$data" ] ||
	    die "the PostgreSQL on 127.0.0.1:$PG_PORT is not the private one (its data directory is" \
	        "'$(pg_datadir "$PG_PORT")', ours $data)"
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
