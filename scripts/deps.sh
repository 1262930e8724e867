#!/bin/sh
# Install the Debian packages the build, the tests and `make run` need (DESIGN §10), only when missing.
set -eu
PKGS="build-essential pkg-config libhiredis-dev libpq-dev libmsgpack-dev libcurl4-openssl-dev libevent-dev
libjansson-dev libjsmn-dev libssl-dev libcmocka-dev clang libclang-rt-14-dev redis-server postgresql python3-celery
python3-redis python3-msgpack python3-psycopg2 python3-pytest python3-cryptography systemd util-linux supervisor man-db
groff-base"
missing=""
for p in $PKGS; do
	dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
else
	SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
